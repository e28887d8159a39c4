"""DVC stage `prepare`: photos -> FFHQ-aligned faces in WebDataset shards under {storage.root}/shards.

Reads the `prepare` and `storage` sections of params.yaml. The shards, quarantine.jsonl and
manifest.json go to the storage root (local or S3); the stage's DVC outputs are local copies
of the manifest and the quarantine list under data/prepare/, whose content changes whenever
the data does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mambastyle.config import PrepareParams, RayParams, StorageParams, load_params
from mambastyle.data.prepare import run_from_source
from mambastyle.errors import InvalidConfig
from mambastyle.storage import read_bytes

log = logging.getLogger("pipelines.prepare")


def run(params: PrepareParams, storage: StorageParams, ray: RayParams, local_out: Path) -> dict:
    """Runs the stage; returns the manifest."""
    t0 = time.perf_counter()
    manifest, out = run_from_source(params.source, storage.root, params.config(), storage.options(),
                                    params.workers, params.executor, ray.address, ray.num_cpus)  # fmt: skip
    local_out.mkdir(parents=True, exist_ok=True)
    shards = out.join("shards")
    (local_out / "manifest.json").write_bytes(read_bytes(shards.join("manifest.json")))
    (local_out / "quarantine.jsonl").write_bytes(read_bytes(shards.join("quarantine.jsonl")))
    c = manifest["counts"]
    log.info(
        "%d inputs = %d written + %d quarantined %s; %d samples in %d shards at %s (%.1fs)",
        c["inputs"], c["written"], c["quarantined"], c["quarantine_reasons"], c["samples"],
        len(manifest["shards"]), shards.uri, time.perf_counter() - t0,
    )  # fmt: skip
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/prepare", help="local directory for the DVC outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        params = load_params(args.params)
        manifest = run(params.prepare, params.storage, params.ray, Path(args.out))
    except (InvalidConfig, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
