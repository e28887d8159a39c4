"""DVC stage `edit`: bulk edits of selected latent-table rows, rendered into images.

Reads the `edit`, `generator`, `storage` and `ray` sections of params.yaml. The latent table
is `edit.table`, or the invert stage's (named in data/invert/manifest.json). Each edit's
direction is fitted from a table column or loaded from an InterFaceGAN/GANSpace file; the
selected rows (`edit.where`) are edited at every strength on Ray Data and rendered; the images
(WebDataset shards or PNG files) and the edits table are written under
{storage.root}/edits/{run}/ (fitted directions under {storage.root}/edits/directions/). The
stage's DVC outputs are a record of the edits table's manifest, metrics (fit quality, mean
attribute score per strength) and one grid picture per edit under data/edit/.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from mambastyle.config import Params
from mambastyle.edit.pipeline import EditError
from mambastyle.edit.stage import edit_from_params
from mambastyle.errors import CheckpointError
from mambastyle.latents import EDITS_FORMAT, open_table
from mambastyle.runstats import STATS_NAME, TABLE_STATS_NAME
from mambastyle.stage import invert_record, rounded, stage_main, write_metrics
from mambastyle.storage import read_bytes
from mambastyle.visual import save_png

log = logging.getLogger("pipelines.edit")


def run(params: Params, local_out: Path, metrics: Path, invert_out: Path = Path("data/invert")) -> dict:
    """Runs the stage; returns the metrics summary."""
    t0 = time.perf_counter()
    table_uri = params.edit.table
    if table_uri is None:
        record = invert_record(invert_out)
        if record is None:
            raise EditError(
                f"no latent table: edit.table is null and {invert_out / 'manifest.json'} is missing "
                "(run the invert stage)"
            )
        table_uri = record["table"]
    result = edit_from_params(params, table_uri)
    manifest = result.manifest
    edited = open_table(result.prefix.uri, params.storage.options(), fmt=EDITS_FORMAT)
    summary: dict = {
        "rows": manifest["rows"],
        "selected": manifest["selected"],
        "images": manifest["images"]["count"],
        "run": manifest["metadata"]["run_id"],
        "edits": {},
    }
    scores = edited.query("SELECT edit, strength, avg(score) AS score FROM edits GROUP BY ALL ORDER BY ALL")
    for edit in result.edits:
        entry: dict = {"strengths": list(edit.strengths)}
        if edit.direction.info.get("quality"):
            entry["fit"] = edit.direction.info["quality"] | {"rows": edit.direction.info["rows"]}
            entry["attribute_per_unit_strength"] = edit.direction.info["model"]["slope"]
            entry["mean_score"] = {
                str(r["strength"]): r["score"] for r in scores.to_pylist() if r["edit"] == edit.name
            }
        summary["edits"][edit.name] = entry
    root = params.storage.root.rstrip("/")
    summary["table"] = f"{root}/edits/{summary['run']}"  # as the params name it: same in any checkout
    local_out.mkdir(parents=True, exist_ok=True)
    # Part and shard names follow Ray's grouping of rows into write tasks, which varies between
    # runs: the record keeps their counts (the table's own _manifest.json lists them).
    # (and how many rows were computed, resumed or reused: stats.json tells)
    record = {
        k: v for k, v in manifest.items() if k not in ("parts", "shards", "computed", "resumed", "reused")
    }
    record["parts"], record["shards"] = len(manifest["parts"]), len(manifest["shards"])
    record["table"] = summary["table"]
    record["metadata"] = {k: v for k, v in record["metadata"].items() if k != "edits"}  # listed below
    record["images"] = {k: v for k, v in record["images"].items() if k != "bytes"}  # PNG sizes vary by zlib
    (local_out / "manifest.json").write_text(json.dumps(rounded(record), indent=2, sort_keys=True) + "\n")
    (local_out / "metrics.json").write_text(json.dumps(rounded(summary), indent=2, sort_keys=True) + "\n")
    (local_out / STATS_NAME).write_bytes(read_bytes(result.prefix.join(TABLE_STATS_NAME)))  # for the report
    write_metrics(metrics / "edit.json", {
        "counts": {k: summary[k] for k in ("selected", "rows", "images")},
        # per fitted direction: how far the attribute moves per unit of strength, and how well
        # the fit predicts rows it did not see (correlation, or accuracy for a boolean column)
        "fitted": {name: {"per_strength": e["attribute_per_unit_strength"],
                          "cv": next(v for k, v in e["fit"].items() if k.startswith("cv_"))}
                   for name, e in summary["edits"].items() if "fit" in e},
    })  # fmt: skip
    grids = local_out / "grids"
    for old in grids.glob("*.png") if grids.is_dir() else []:
        old.unlink()
    for name, grid in result.grids.items():
        save_png(grid, grids / f"{name}.png")
    log.info("%d edited rows (%d selected) -> %s in %.1fs", manifest["rows"], manifest["selected"],
             result.prefix.uri, time.perf_counter() - t0)  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        argv,
        __doc__,
        "data/edit",
        run,
        (CheckpointError, EditError, FileNotFoundError),
        log,
        show=lambda summary: summary,
        invert_out=True,
    )


if __name__ == "__main__":
    sys.exit(main())
