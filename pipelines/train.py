"""DVC stage `train`: MambaStyle encoder training on Ray Train, from the prepare stage's shards.

Reads the `train`, `generator` and `storage` sections of params.yaml (and `ray` for where
to run). The same module is the cluster entry point:

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env infra/runtime-env.yaml -- python -m pipelines.train

Checkpoints, metrics and the exported encoder live under {storage.root}/train-runs/ (local or S3);
the stage's DVC outputs are small local files under data/train/: encoder.json (where the
encoder is, its sha256, step, generator identity) and DVCLive metrics, curves and
reconstruction grids. Re-running the same inputs resumes the run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import posixpath
import sys
import time
from pathlib import Path

from mambastyle.config import Params, load_params, to_dict
from mambastyle.errors import CheckpointError, InvalidConfig
from mambastyle.storage import exists, read_bytes, resolve
from mambastyle.train.data import ShardError, ShardStream, manifest_shards
from mambastyle.train.distributed import (
    RUNS_DIR,
    TrainJob,
    export_encoder,
    fit,
    load_state,
    run_name,
    write_run_records,
)
from mambastyle.train.losses import MissingWeights

log = logging.getLogger("pipelines.train")


def run(params: Params, local_out: Path) -> dict:
    """Trains (or resumes) and exports the encoder; returns the encoder.json record."""
    from mambastyle.runtime import connect_ray

    t0 = time.perf_counter()
    options = params.storage.options()
    root = resolve(params.storage.root, options)
    manifest_loc = root.join("shards", "manifest.json")
    manifest = read_bytes(manifest_loc) if exists(manifest_loc) else None
    if manifest is None and params.train.synthetic_ratio < 1.0:
        raise ShardError(f"no shard manifest at {manifest_loc.uri}: run the prepare stage first")
    if params.train.synthetic_ratio < 1.0:
        ShardStream(manifest_shards(root, "train"), 0, params.train.num_workers)  # fails early, clearly
    # Workers run elsewhere (another directory, another node): give them an absolute root.
    storage = dataclasses.replace(params.storage, root=root.uri)
    job = TrainJob(
        params.train, params.generator, storage, run_name(params.train, params.generator, manifest)
    )
    log.info("run %s: %d steps on %d worker(s), checkpoints under %s", job.run, params.train.steps,
             params.train.num_workers, job.location(RUNS_DIR, job.run).uri)  # fmt: skip
    connect_ray(params.ray.address, params.ray.num_cpus, params.ray.num_gpus)
    result = fit(job)
    if result.checkpoint is None:
        raise RuntimeError(f"run {job.run} finished without a checkpoint")
    state = load_state(result.checkpoint)
    loc, sha, meta = export_encoder(job, state)

    history = write_run_records(job, local_out / "dvclive")
    final = next((m for m in reversed(history) if "eval/latent_rel" in m), history[-1] if history else {})
    record = {
        # as the params name it (e.g. data/... stays relative), so the record is the same in any checkout
        "uri": posixpath.join(params.storage.root, loc.uri[len(root.uri) :].lstrip("/")),
        "sha256": sha,
        "run": job.run,
        "step": meta["step"],
        "encoder": meta["config"],
        "generator": meta["generator"],
        "loss_status": state.get("loss_status"),
        "params": to_dict(params.train),
        "final_metrics": {k: v for k, v in final.items() if k.startswith(("eval/", "loss/"))},
    }
    (local_out / "encoder.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("encoder (step %d) -> %s in %.1fs; %s", meta["step"], loc.uri, time.perf_counter() - t0,
             {k: round(v, 4) for k, v in record["final_metrics"].items()})  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/train", help="local directory for the DVC outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        record = run(load_params(args.params), Path(args.out))
    except (InvalidConfig, CheckpointError, ShardError, MissingWeights, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps({"encoder": record["uri"], "step": record["step"], **record["final_metrics"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
