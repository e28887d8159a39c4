"""DVC stage `train`: MambaStyle encoder training on Ray Train, from the prepare stage's shards.

Reads the `train`, `generator` and `storage` sections of params.yaml (and `ray` for where
to run). The same module is the cluster entry point:

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env infra/runtime-env.yaml -- python -m pipelines.train

Checkpoints, metrics and the exported encoder live under {storage.root}/train-runs/ (local or S3);
the stage's DVC outputs are small local files under data/train/: encoder.json (where the
encoder is, its sha256, step, generator identity) and the last reconstruction grid; the
headline figures go to metrics/train.json and the curves to metrics/train/ (tracked by git).
Re-running the same inputs resumes the run from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from mambastyle.config import Params
from mambastyle.data.shards import ShardError
from mambastyle.errors import CheckpointError
from mambastyle.pretrained import MissingWeights
from mambastyle.runs import RUNS_DIR, encoder_job, export_encoder
from mambastyle.stage import stage_main, write_metrics
from mambastyle.train.distributed import headline_metrics, train_and_export, train_worker

log = logging.getLogger("pipelines.train")


def run(params: Params, local_out: Path, metrics: Path) -> dict:
    """Trains (or resumes) and exports the encoder; returns the encoder.json record."""
    t0 = time.perf_counter()
    job = encoder_job(params)
    log.info("run %s: %d steps on %d worker(s), checkpoints under %s", job.run_id, params.train.steps,
             params.train.num_workers, job.location(RUNS_DIR, job.run_id).uri)  # fmt: skip
    record, meta = train_and_export(params, job, train_worker, export_encoder, local_out, metrics / "train",
                                    "eval/latent_rel")  # fmt: skip
    record["encoder"] = meta["config"]
    (local_out / "encoder.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    write_metrics(
        metrics / "train.json", headline_metrics(record, ("eval/latent_rel", "eval/real_mse", "loss/total"))
    )
    log.info("encoder (step %d) -> %s in %.1fs; %s", record["step"], record["uri"], time.perf_counter() - t0,
             {k: round(v, 4) for k, v in record["final_metrics"].items()})  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        argv,
        __doc__,
        "data/train",
        run,
        (CheckpointError, ShardError, MissingWeights, FileNotFoundError),
        log,
        show=lambda r: {"encoder": r["uri"], "step": r["step"], **r["final_metrics"]},
    )


if __name__ == "__main__":
    sys.exit(main())
