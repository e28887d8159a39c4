"""DVC stage `evaluate`: how good the inverting encoder is, for `dvc metrics show/diff`.

Reads the `evaluate`, `generator`, `storage` sections of params.yaml (and `train.pretrained.arcface`,
`invert.lpips_alexnet` as defaults for the weights) and the encoder the invert stage used (named in
data/invert/manifest.json). On the `evaluate.split` faces of the prepare stage's shards: MSE, SSIM,
LPIPS and ArcFace identity similarity of the reconstructions (the last two only when their weights
are there; otherwise listed under `not_measured` with the reason); latent recovery on held-out
generator samples; the encoder's parameter count. When the table was inverted with a fuser, the
reconstruction metrics are measured with its feature correction too (`reconstruction_fuser`).
Writes data/evaluate/metrics.json and data/evaluate/reconstructions.png (each face next to its
reconstruction, and the fuser's). The encoder's speed
(ms/image, which varies from run to run) goes to data/evaluate/latency.json, a metric DVC shows
but does not lock.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from mambastyle.config import Params
from mambastyle.errors import CheckpointError
from mambastyle.runtime import stage_main

log = logging.getLogger("pipelines.evaluate")


def _summary(values: list[float]) -> float:
    # 6 digits: codes (and so reconstructions) can differ in their last bits between runs
    return float(f"{math.fsum(values) / len(values):.6g}")


def run(params: Params, local_out: Path, invert_out: Path = Path("data/invert")) -> dict:
    """Runs the stage; returns the metrics."""
    import torch

    from mambastyle.checkpoints import checkpoint_source, load_encoder
    from mambastyle.evaluate import latency, latent_recovery, reconstruction_metrics
    from mambastyle.generate import resolve_generator
    from mambastyle.storage import resolve
    from mambastyle.train.data import decode_png, manifest_shards, read_shard
    from mambastyle.train.losses import (
        IdentityLoss,
        alexnet_hub_path,
        build_lpips,
        load_arcface,
        weights_available,
    )
    from mambastyle.visual import make_grid, save_png, to_uint8

    t0 = time.perf_counter()
    record_path = invert_out / "manifest.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} is missing: run the invert stage first")
    record = json.loads(record_path.read_text())
    encoder_uri = record["metadata"]["encoder_uri"]
    options = params.storage.options()
    fuser = None
    if record["metadata"].get("fuser_uri"):  # the table was inverted with a fuser: measure both
        from mambastyle.checkpoints import load_fuser

        encoder, fuser, _ = load_fuser(checkpoint_source(record["metadata"]["fuser_uri"], options))
    else:
        encoder, _ = load_encoder(checkpoint_source(encoder_uri, options))
    gp, ep = params.generator, params.evaluate
    g = resolve_generator(
        gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples, options=options
    )

    not_measured = {}
    lpips_net = identity = None
    # (the reasons name files as the params do, so the record is the same on every machine)
    lp_uri = ep.lpips_alexnet or params.invert.lpips_alexnet
    if weights_available(lp_uri or alexnet_hub_path(), options):
        lpips_net = build_lpips(lp_uri or alexnet_hub_path(), options)
    else:
        where = f"at {lp_uri}" if lp_uri else "in the torch hub cache"
        not_measured["lpips"] = f"no AlexNet weights {where} (evaluate.lpips_alexnet)"
    arc_uri = ep.arcface or params.train.pretrained.arcface
    if weights_available(arc_uri, options):
        identity = IdentityLoss(load_arcface(arc_uri, options)).eval()
    else:
        where = (
            f"at {arc_uri}"
            if arc_uri
            else "configured: evaluate.arcface and train.pretrained.arcface are null"
        )
        not_measured["id_similarity"] = f"no ArcFace IR-SE50 weights {where}"

    root = resolve(params.storage.root, options)
    shards = manifest_shards(root, ep.split)

    def images():
        for shard in shards:
            for key, png in read_shard(shard.uri, options):
                yield decode_png(png, f"{shard.uri}#{key}")

    with torch.no_grad():
        values, pairs = reconstruction_metrics(
            encoder, g, images(), ep.batch_size, lpips_net, identity, fuser
        )
    n = len(values["mse"])
    if n == 0:
        raise FileNotFoundError(f"the shards hold no {ep.split!r} faces to evaluate")
    metrics: dict = {
        "split": ep.split,
        "images": n,
        "reconstruction": {k: _summary(v) for k, v in values.items() if not k.endswith("_fuser")},
        "latent_recovery": {
            k: (float(f"{v:.6g}") if isinstance(v, float) else v)
            for k, v in latent_recovery(
                encoder, g, ep.synthetic_samples, ep.seed, ep.truncation, ep.batch_size
            ).items()
        },  # fmt: skip
        "encoder": {
            "arch": encoder.config.arch,
            "parameters": sum(p.numel() for p in encoder.parameters()),
            "uri": encoder_uri,
        },  # fmt: skip
        "not_measured": not_measured,
    }
    if fuser is not None:  # the same faces with the fuser's feature correction
        metrics["reconstruction_fuser"] = {k[: -len("_fuser")]: _summary(v) for k, v in values.items()
                                           if k.endswith("_fuser")}  # fmt: skip
        metrics["fuser"] = {"parameters": sum(p.numel() for p in fuser.parameters()),
                            "inject_res": fuser.config.inject_res}  # fmt: skip
    local_out.mkdir(parents=True, exist_ok=True)
    (local_out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    speed = latency(encoder, ep.batch_size, ep.latency_batches)
    (local_out / "latency.json").write_text(json.dumps(speed, indent=2, sort_keys=True) + "\n")
    # up to 4 faces a row, each followed by its reconstruction (and the fuser's)
    shown = pairs[: ep.grid_samples]
    grid = make_grid(to_uint8(torch.stack(shown).flatten(0, 1)), ncols=shown[0].shape[0] * min(4, len(shown)))
    save_png(grid, local_out / "reconstructions.png")
    log.info("%d %s faces: %s; latent recovery %s; %.2f ms/image; not measured: %s (%.1fs)", n, ep.split,
             metrics["reconstruction"], metrics["latent_recovery"], speed["ms_per_image"],
             sorted(not_measured) or "none", time.perf_counter() - t0)  # fmt: skip
    return {**metrics, "latency": speed}


def main(argv: list[str] | None = None) -> int:
    from mambastyle.train.data import ShardError

    return stage_main(
        argv,
        __doc__,
        "data/evaluate",
        run,
        (CheckpointError, ShardError, FileNotFoundError),
        log,
        show=lambda metrics: metrics,
        invert_out=True,
    )


if __name__ == "__main__":
    sys.exit(main())
