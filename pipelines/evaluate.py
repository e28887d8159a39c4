"""DVC stage `evaluate`: how good the inverting encoder is, for `dvc metrics show/diff`.

Reads the `evaluate`, `generator`, `storage` sections of params.yaml (and `train.pretrained.arcface`,
`invert.lpips_alexnet` as defaults for the weights) and the encoder the invert stage used (named in
data/invert/manifest.json). On the `evaluate.split` faces of the prepare stage's shards: MSE, SSIM,
LPIPS and ArcFace identity similarity of the reconstructions (the last two only when their weights
are there; otherwise listed under `not_measured` with the reason); latent recovery on held-out
generator samples; the encoder's parameter count. When the table was inverted with a fuser, the
reconstruction metrics are measured with its feature correction too (`reconstruction_fuser`).
Writes data/evaluate/metrics.json and data/evaluate/reconstructions.png (each face next to its
reconstruction, and the fuser's), and the headline figures to metrics/evaluate.json. The encoder's
speed (ms/image, which varies from run to run) goes to data/evaluate/latency.json and
metrics/latency.json, a metric DVC shows but no stage locks.

Side by side (`evaluate.encoders`: the invert stage's encoder and any other checkpoint, official
pSp/e4e/ReStyle/MambaStyle files included, each checked against the configured generator): on the
same faces, each encoder's parameters, ms/image at batch 1 and 8, MSE, SSIM, LPIPS, ArcFace
identity and dlib identity (`identity_dlib`), and its editability: a yaw direction (a file, or
fitted from the latent table's `yaw`) applied at `evaluate.editability.strengths`, the edited
faces' yaw re-measured from their landmarks. Writes data/evaluate/comparison.json (each other
encoder's main figures also go to metrics/evaluate.json under `encoders`; the speeds, which vary
from run to run, go to latency.json under `encoders`), comparison.md (all of it as one table)
and comparison.png (each input, then each encoder's reconstruction, in the order listed).
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
from mambastyle.stage import invert_record, stage_main, write_metrics

log = logging.getLogger("pipelines.evaluate")


def _summary(values: list[float]) -> float:
    # 6 digits: codes (and so reconstructions) can differ in their last bits between runs
    return float(f"{math.fsum(values) / len(values):.6g}")


def run(params: Params, local_out: Path, metrics_dir: Path, invert_out: Path = Path("data/invert")) -> dict:
    """Runs the stage; returns the metrics."""
    import torch

    from mambastyle.checkpoints import checkpoint_source, load_encoder
    from mambastyle.data.shards import decode_png, manifest_shards, read_shard
    from mambastyle.evaluate import latency, latent_recovery, reconstruction_metrics
    from mambastyle.generate import resolve_generator
    from mambastyle.storage import resolve
    from mambastyle.visual import make_grid, save_png, to_uint8

    t0 = time.perf_counter()
    record = invert_record(invert_out)
    if record is None:
        raise FileNotFoundError(f"{invert_out / 'manifest.json'} is missing: run the invert stage first")
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

    from mambastyle.models.inversion import warn_if_emulated

    warn_if_emulated("evaluate.precision", ep.precision, encoder.latent_avg.device)
    lpips_net, identity, not_measured = _metric_nets(params)
    root = resolve(params.storage.root, options)
    shards = manifest_shards(root, ep.split)

    def images():
        for shard in shards:
            for key, png in read_shard(shard.uri, options):
                yield decode_png(png, f"{shard.uri}#{key}")

    with torch.no_grad():
        values, pairs = reconstruction_metrics(
            encoder, g, images(), ep.batch_size, lpips_net, identity, fuser, ep.precision
        )
    n = len(values["mse"])
    if n == 0:
        raise FileNotFoundError(f"the shards hold no {ep.split!r} faces to evaluate")
    recovery = latent_recovery(encoder, g, ep.synthetic_samples, ep.seed, ep.truncation, ep.batch_size,
                               ep.precision)  # fmt: skip
    metrics = _metrics_record(ep, values, recovery, encoder, encoder_uri, fuser, not_measured)
    local_out.mkdir(parents=True, exist_ok=True)
    (local_out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    comparison, speeds, shown_side = _compare(params, record, encoder, encoder_uri, g, images, lpips_net,
                                              identity, dict(not_measured))  # fmt: skip
    (local_out / "comparison.json").write_text(json.dumps(comparison, indent=2, sort_keys=True) + "\n")
    table = _table(comparison, speeds)
    (local_out / "comparison.md").write_text(table)
    log.info("encoders side by side on %d %s faces:\n%s", comparison["images"], ep.split, table)
    side = shown_side[: ep.grid_samples]
    save_png(make_grid(to_uint8(torch.stack(side).flatten(0, 1)), ncols=side[0].shape[0]),
             local_out / "comparison.png")  # fmt: skip
    speed = {**latency(encoder, ep.batch_size, ep.latency_batches, ep.precision), "encoders": speeds}
    (local_out / "latency.json").write_text(json.dumps(speed, indent=2, sort_keys=True) + "\n")
    own = {e.name for e in ep.encoders if e.uri is None}  # the pipeline's encoder, by its name here
    write_metrics(metrics_dir / "evaluate.json", _headline(metrics, comparison, own))
    # speed varies from run to run: a metric of its own, outside the stage's locked outputs
    batch_sizes = next((speeds[name] for name in sorted(own) if name in speeds), {})
    write_metrics(metrics_dir / "latency.json", {"ms_per_image": speed["ms_per_image"], **batch_sizes})
    # up to 4 faces a row, each followed by its reconstruction (and the fuser's)
    shown = pairs[: ep.grid_samples]
    grid = make_grid(to_uint8(torch.stack(shown).flatten(0, 1)), ncols=shown[0].shape[0] * min(4, len(shown)))
    save_png(grid, local_out / "reconstructions.png")
    log.info("%d %s faces: %s; latent recovery %s; %.2f ms/image; not measured: %s (%.1fs)", n, ep.split,
             metrics["reconstruction"], metrics["latent_recovery"], speed["ms_per_image"],
             sorted(not_measured) or "none", time.perf_counter() - t0)  # fmt: skip
    return {**metrics, "latency": speed}


def _headline(metrics: dict, comparison: dict, own: set[str]) -> dict:
    """What ``dvc exp show`` compares: the pipeline encoder's quality, latent recovery, the fuser's
    quality and editability, and the main figures of each other encoder in ``evaluate.encoders``."""
    recovery = metrics["latent_recovery"]
    head: dict = {
        "images": metrics["images"],
        "quality": dict(metrics["reconstruction"]),
        "latent": {k: recovery[k] for k in ("latent_rel", "style_rel") if k in recovery},
    }
    if "reconstruction_fuser" in metrics:
        head["fuser"] = dict(metrics["reconstruction_fuser"])
    for name, row in comparison["encoders"].items():
        edit = row.get("editability", {})
        figures = {k: row[k] for k in ("mse", "ssim", "lpips", "id_similarity", "identity_dlib") if k in row}
        figures |= {k: edit[k] for k in ("yaw_per_strength", "linearity_r2") if k in edit}
        if name in own:
            head["quality"] |= {k: figures[k] for k in ("identity_dlib",) if k in figures}
            if edit:
                head["editability"] = {
                    k: figures[k] for k in ("yaw_per_strength", "linearity_r2") if k in figures
                }
        else:
            head.setdefault("encoders", {})[name] = figures
    return head


def _metrics_record(
    ep, values: dict, recovery: dict, encoder, encoder_uri: str, fuser, not_measured: dict
) -> dict:
    """metrics.json: the pipeline encoder's reconstruction (and with the fuser), latent recovery."""
    from mambastyle.models.inversion import precision_tag

    metrics: dict = {
        "split": ep.split,
        "images": len(values["mse"]),
        "reconstruction": {k: _summary(v) for k, v in values.items() if not k.endswith("_fuser")},
        "latent_recovery": {
            k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in recovery.items()
        },
        "encoder": {
            "arch": encoder.config.arch,
            "parameters": sum(p.numel() for p in encoder.parameters()),
            "uri": encoder_uri,
        },  # fmt: skip
        "not_measured": not_measured,
        **precision_tag(ep.precision),
    }
    if fuser is not None:  # the same faces with the fuser's feature correction
        metrics["reconstruction_fuser"] = {k[: -len("_fuser")]: _summary(v) for k, v in values.items()
                                           if k.endswith("_fuser")}  # fmt: skip
        metrics["fuser"] = {"parameters": sum(p.numel() for p in fuser.parameters()),
                            "inject_res": fuser.config.inject_res}  # fmt: skip
    return metrics


def _metric_nets(params: Params):
    """(LPIPS or None, ArcFace identity or None, {metric: why it is not measured}). The reasons
    name files as the params do, so the record is the same on every machine."""
    from mambastyle.pretrained import (
        IdentityLoss,
        alexnet_hub_path,
        build_lpips,
        load_arcface,
        weights_available,
    )

    ep, options = params.evaluate, params.storage.options()
    not_measured = {}
    lpips_net = identity = None
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
    return lpips_net, identity, not_measured


def _compare(params: Params, record: dict, pipeline_encoder, encoder_uri: str, g, images, lpips_net, identity,
             not_measured: dict) -> tuple[dict, list]:  # fmt: skip
    """The side-by-side table of ``evaluate.encoders`` (see the module docstring)."""
    from mambastyle.checkpoints import check_encoder_generator, checkpoint_source, load_encoder
    from mambastyle.data.align import AlignmentUnavailable
    from mambastyle.evaluate import compare_encoders, editability, latency

    ep, gp = params.evaluate, params.generator
    options = params.storage.options()
    generator_name = gp.checkpoint or f"the random generator (seed {gp.init_seed})"
    encoders, sources = {}, {}
    for entry in ep.encoders:
        if entry.uri is None:
            encoders[entry.name], sources[entry.name] = pipeline_encoder, encoder_uri
            continue
        enc, meta = load_encoder(checkpoint_source(entry.uri, options))
        check_encoder_generator(meta, g, entry.uri, generator_name)
        encoders[entry.name], sources[entry.name] = enc, entry.uri
    try:
        from mambastyle.identity import DlibIdentity

        dlib_identity = DlibIdentity()
    except AlignmentUnavailable as exc:
        dlib_identity = None
        not_measured["identity_dlib"] = str(exc)
    values, shown = compare_encoders(encoders, g, images(), ep.batch_size, lpips_net, identity, dlib_identity,
                                     ep.precision)  # fmt: skip
    direction, direction_info = _yaw_direction(params, record, g)
    if direction is None:
        not_measured["editability"] = direction_info["reason"]
    rows, speeds = {}, {}
    for name, enc in encoders.items():
        row = {k: _summary(v) for k, v in values[name].items()}
        n_params = sum(p.numel() for p in enc.parameters())
        row.update(arch=enc.config.arch, uri=sources[name], parameters=n_params)
        speeds[name] = {f"ms_per_image_batch{b}": latency(enc, b, ep.latency_batches, ep.precision)
                        ["ms_per_image"] for b in (1, 8)}  # fmt: skip
        if direction is not None:
            edit = editability(enc, g, images(), direction, ep.editability.strengths, ep.batch_size,
                               dlib_identity, ep.precision)  # fmt: skip
            row["editability"] = {k: _round(v) for k, v in edit.items()}
        rows[name] = row
    comparison = {
        "split": ep.split,
        "images": len(shown),
        "size": min(e.config.input_size for e in encoders.values()),
        "encoders": rows,
        "direction": {k: v for k, v in direction_info.items() if k != "reason"},
        "not_measured": {k: v for k, v in not_measured.items() if k not in ("lpips_fuser",)},
    }
    return comparison, speeds, shown


def _table(comparison: dict, speeds: dict) -> str:
    """comparison.json and the speeds as one Markdown table, an encoder a row."""
    rows = comparison["encoders"]
    metric_names = ("mse", "ssim", "lpips", "id_similarity", "identity_dlib")
    quality = [k for k in metric_names if any(k in r for r in rows.values())]
    edit = ("yaw_per_strength", "linearity_r2", "identity_kept_dlib")
    head = ["encoder", "parameters", "ms/image b1", "ms/image b8", *quality, *(f"edit {k}" for k in edit)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        ms = [f"{speeds[name][f'ms_per_image_batch{b}']:.1f}" for b in (1, 8)]
        cells = [name, f"{r['parameters'] / 1e6:.2f}M", *ms]
        cells += [f"{r[k]:.4f}" if k in r else "not measured" for k in quality]
        done = r.get("editability", {})
        cells += [f"{done[k]:.3f}" if k in done else "not measured" for k in edit]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _round(value):
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _yaw_direction(params: Params, record: dict, g):
    """The editability direction: the configured file, or a W direction fitted from the latent
    table's ``yaw`` on the faces outside the evaluated split (all faces when those are too few).
    Returns (vector or None, description)."""
    from mambastyle.directions import DirectionError, load_direction
    from mambastyle.latents import LatentTableError, open_table

    ep, options = params.evaluate, params.storage.options()
    if ep.editability.direction is not None:
        d = load_direction(ep.editability.direction, g.n_styles, g.style_dim, options)
        return d.vector, {"source": ep.editability.direction, "sha256": d.sha256}
    if not record.get("table"):
        reason = "evaluate.editability.direction is null and the invert record names no table"
        return None, {"reason": reason}
    from mambastyle.directions import fit_direction

    try:
        table = open_table(record["table"], options)
        outside = f"split != '{ep.split}' AND yaw IS NOT NULL"
        n_outside = table.query(f"SELECT count(*) AS n FROM latents WHERE {outside}").column("n")[0].as_py()
        where = outside if n_outside >= 10 else "yaw IS NOT NULL"
        rows = table.query(f"SELECT w_plus, yaw FROM latents WHERE {where} ORDER BY key")
        provenance = {"column": "yaw", "where": where, "table": record["table"]}
        d = fit_direction(table.w_plus(rows), rows.column("yaw").to_pylist(), "W", provenance=provenance)
    except (LatentTableError, DirectionError) as exc:
        return None, {"reason": f"no yaw direction could be fitted from {record['table']}: {exc}"}
    quality = d.info.get("quality", {})
    return d.vector, {"source": "fit", "column": "yaw", "where": where, "rows": d.info.get("rows"),
                      "quality": quality}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from mambastyle.data.shards import ShardError
    from mambastyle.directions import DirectionError

    return stage_main(
        argv,
        __doc__,
        "data/evaluate",
        run,
        (CheckpointError, ShardError, FileNotFoundError, DirectionError),
        log,
        show=lambda metrics: metrics,
        invert_out=True,
    )


if __name__ == "__main__":
    sys.exit(main())
