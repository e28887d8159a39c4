"""DVC stage `prepare`: photos -> FFHQ-aligned faces in WebDataset shards under {storage.root}/shards.

Reads the `prepare` and `storage` sections of params.yaml. The shards, quarantine.jsonl and
manifest.json go to the storage root (local or S3); the stage's DVC outputs are local copies
of the manifest and the quarantine list under data/prepare/, whose content changes whenever
the data does.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from mambastyle.config import Params
from mambastyle.data.faces import PrepareConfig
from mambastyle.data.prepare import run_from_source
from mambastyle.runstats import STATS_NAME
from mambastyle.stage import stage_main, write_metrics
from mambastyle.storage import read_bytes

log = logging.getLogger("pipelines.prepare")


def run(params: Params, local_out: Path, metrics: Path) -> dict:
    """Runs the stage; returns the manifest."""
    pp, storage, ray = params.prepare, params.storage, params.ray
    t0 = time.perf_counter()
    config = PrepareConfig.from_params(pp)
    manifest, out = run_from_source(pp.source, storage.root, config, storage.options(),
                                    pp.workers, pp.executor, ray.address, ray.num_cpus, pp.mode)  # fmt: skip
    local_out.mkdir(parents=True, exist_ok=True)
    shards = out.join("shards")
    (local_out / "manifest.json").write_bytes(read_bytes(shards.join("manifest.json")))
    (local_out / "quarantine.jsonl").write_bytes(read_bytes(shards.join("quarantine.jsonl")))
    (local_out / STATS_NAME).write_bytes(read_bytes(shards.join(STATS_NAME)))  # for the report
    c = manifest["counts"]
    samples = {split: entry["samples"] for split, entry in sorted(manifest["splits"].items())}
    write_metrics(metrics / "prepare.json", {
        "counts": {k: c[k] for k in ("inputs", "written", "quarantined")}, "samples": samples,
    })  # fmt: skip
    log.info(
        "%d inputs = %d written + %d quarantined %s; %d samples in %d shards at %s (%.1fs)",
        c["inputs"], c["written"], c["quarantined"], c["quarantine_reasons"], c["samples"],
        len(manifest["shards"]), shards.uri, time.perf_counter() - t0,
    )  # fmt: skip
    return manifest


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        argv,
        __doc__,
        "data/prepare",
        run,
        (FileNotFoundError, ValueError),
        log,
        show=lambda manifest: manifest["counts"],
    )


if __name__ == "__main__":
    sys.exit(main())
