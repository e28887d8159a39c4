"""DVC stage `invert`: Ray Data bulk inversion of the prepare stage's shards into a latent table.

Reads the `invert`, `generator`, `storage` and `ray` sections of params.yaml (and `train`, to
find the train stage's encoder when `invert.encoder` is null). The table is written under
{storage.root}/latents/{run}/ (local or S3; `run` derives from the shard manifest, encoder,
generator and settings, so a re-run replaces it); the stage's DVC outputs are a local copy of
the table's manifest and a metrics summary under data/invert/. Query the table with
`mambastyle latents query URI "SQL"`.
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
from mambastyle.invert.pipeline import InvertError, invert_from_params
from mambastyle.latents import METRIC_COLUMNS, open_table
from mambastyle.runstats import STATS_NAME, TABLE_STATS_NAME
from mambastyle.stage import stage_main, write_metrics
from mambastyle.storage import read_bytes

log = logging.getLogger("pipelines.invert")


def run(params: Params, local_out: Path, metrics: Path) -> dict:
    """Runs the stage; returns the metrics summary."""
    t0 = time.perf_counter()
    manifest, prefix = invert_from_params(params)
    table = open_table(prefix.uri, params.storage.options())
    summary = {
        "rows": manifest["rows"],
        "splits": {},
        "table": prefix.uri,
        "run": manifest["metadata"]["run_id"],
    }
    # Means with exact (order-independent) sums, rounded: which rows share a batch and a part
    # varies between runs, and the DVC-tracked summary must not.
    rows = table.to_table(columns=["split", *METRIC_COLUMNS]).to_pylist()
    for split in sorted({r["split"] for r in rows}):
        mine = [r for r in rows if r["split"] == split]
        entry: dict = {"n": len(mine)}
        for metric in METRIC_COLUMNS:
            values = [r[metric] for r in mine if r[metric] is not None]
            if values:  # 6 digits: per-image values vary in the last float32 bit with batching
                entry[metric] = float(f"{math.fsum(values) / len(values):.6g}")
        summary["splits"][split] = entry
    local_out.mkdir(parents=True, exist_ok=True)
    # The local record leaves out what varies between runs of the same inputs: the parts (how
    # Ray groups rows into write tasks) and how many rows were computed, resumed or reused
    # (stats.json tells); the table's own _manifest.json has them all.
    record = {k: v for k, v in manifest.items() if k not in ("parts", "computed", "resumed", "reused")}
    # the table URI as the params name it, so the record is the same in any checkout
    record["table"] = f"{params.storage.root.rstrip('/')}/latents/{summary['run']}"
    summary["table"] = record["table"]
    (local_out / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (local_out / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (local_out / STATS_NAME).write_bytes(read_bytes(prefix.join(TABLE_STATS_NAME)))  # for the report
    write_metrics(metrics / "invert.json", {
        "counts": {"rows": summary["rows"]},  # per split: the prepare stage's samples
    })  # fmt: skip
    log.info(
        "%d rows %s -> %s in %.1fs",
        manifest["rows"],
        manifest["splits"],
        prefix.uri,
        time.perf_counter() - t0,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        argv,
        __doc__,
        "data/invert",
        run,
        (CheckpointError, InvertError, FileNotFoundError),
        log,
        show=lambda summary: summary,
    )


if __name__ == "__main__":
    sys.exit(main())
