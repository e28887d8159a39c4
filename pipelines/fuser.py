"""DVC stage `fuser`: F-space fuser training on Ray Train, refining the train stage's encoder.

Reads the `fuser`, `generator`, `storage` and `ray` sections of params.yaml (and `train`, to
find the train stage's encoder when `fuser.encoder` is null, and for the pretrained files of
the LPIPS and identity terms). The same module is the cluster entry point:

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env infra/runtime-env.yaml -- python -m pipelines.fuser

Checkpoints, metrics and the exported fuser (``fuser.pt``: the encoder and the fuser with their
configs) live under {storage.root}/fuser-runs/{run}/; the stage's DVC outputs are small local
files under data/fuser/: fuser.json (where the checkpoint is, its sha256, step, the held-out
MSE with and without the fuser) and DVCLive metrics, curves and pictures (input | W+ | fuser).
With `fuser.enabled: false` the stage records that and trains nothing.
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
from mambastyle.runs import export_fuser, fuser_job
from mambastyle.stage import stage_main, write_metrics
from mambastyle.train.distributed import fuser_worker, headline_metrics, train_and_export

log = logging.getLogger("pipelines.fuser")

# held-out MSE of real faces without and with the fuser, and of edited synthetic faces with it
FIGURES = ("eval/real_mse_wplus", "eval/real_mse_fuser", "eval/edit_mse_fuser", "loss/total")


def run(params: Params, local_out: Path, metrics: Path) -> dict:
    """Trains (or resumes) and exports the fuser; returns the fuser.json record."""
    t0 = time.perf_counter()
    local_out.mkdir(parents=True, exist_ok=True)
    if not params.fuser.enabled:  # the declared outputs, saying so
        record = {"enabled": False}
        (local_out / "fuser.json").write_text(json.dumps(record, indent=2) + "\n")
        (local_out / "reconstruction.png").unlink(missing_ok=True)
        (metrics / "fuser").mkdir(parents=True, exist_ok=True)  # the declared curves: none
        write_metrics(metrics / "fuser.json", record)
        log.info("fuser.enabled is false: nothing to train")
        return record
    job, encoder = fuser_job(params)
    log.info("run %s: %d steps on %d worker(s), refining %s", job.run_id, params.fuser.steps,
             params.fuser.num_workers, job.encoder_uri)  # fmt: skip
    record, meta = train_and_export(params, job, fuser_worker, export_fuser, local_out, metrics / "fuser",
                                    "eval/edit_mse_fuser")  # fmt: skip
    record.update(enabled=True, fuser=meta["fuser_config"], encoder=encoder)
    (local_out / "fuser.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    write_metrics(metrics / "fuser.json", {"enabled": True, **headline_metrics(record, FIGURES)})
    log.info("fuser (step %d) -> %s in %.1fs; %s", record["step"], record["uri"], time.perf_counter() - t0,
             {k: round(v, 4) for k, v in record["final_metrics"].items()})  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        argv,
        __doc__,
        "data/fuser",
        run,
        (CheckpointError, ShardError, MissingWeights, FileNotFoundError),
        log,
        show=lambda record: {k: record[k] for k in ("uri", "step", "final_metrics") if k in record},
    )


if __name__ == "__main__":
    sys.exit(main())
