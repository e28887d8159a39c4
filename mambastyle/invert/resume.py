"""Resumable, incremental inversion: which of a run's rows already exist, and where.

A latent table's rows are computed per prepare-stage shard, and every part file holds the rows
of one shard only (``split={split}/{shard stem}-{random}.parquet``; a manifest entry names the
shard and its sha256). Two kinds of earlier work are found before anything is computed:

- **staged**: parts a killed run of the same run id left under the table's prefix (written
  whole, so each is complete; a part from other code or another run is deleted). Shards they
  cover completely are not read again; the keys of a partly covered shard are skipped.
- **reused**: for a shard no staged part covers, the parts of another committed table under
  the same ``latents/`` folder made by the same computation (encoder, generator, settings and
  inversion code: ``compute_sha256``) from a shard of the same path and sha256. They are
  rewritten into the new table with its metadata (no model runs), and the manifest says where
  they came from.

What remains goes to the Ray Data job. At the commit every part is checked against the shard
manifest (each shard's rows complete, keys unique) and the files under the prefix that the
manifest does not list are removed.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mambastyle.latents import (
    MANIFEST,
    TABLE_FORMAT,
    schema_metadata,
    sibling_tables,
    table_metadata,
    write_part,
)
from mambastyle.runstats import TABLE_STATS_NAME
from mambastyle.storage import Location, delete, list_files

log = logging.getLogger(__name__)

REUSE_KEYS = ("compute_sha256", "encoder_sha256", "generator_sha256", "metrics")  # must all be equal


def shard_stem(shard_path: str) -> str:
    """``train/train-000003.tar`` -> ``train-000003``: the prefix of that shard's part names."""
    return posixpath.basename(shard_path).removesuffix(".tar")


def part_path(split: str, shard_path: str) -> str:
    """A new part's path for rows of ``shard_path``; the random tail keeps a resumed run from
    overwriting a part a killed run already wrote for the same shard."""
    return f"split={split}/{shard_stem(shard_path)}-{uuid.uuid4().hex[:12]}.parquet"


def part_entry(path: str, shard: Mapping, rows: int, **extra) -> dict:
    """A manifest entry for a part: where it is, which shard (and content) its rows come from."""
    return {"path": path, "split": shard["split"], "rows": rows, "shard": shard["path"],
            "shard_sha256": shard.get("sha256"), **extra}  # fmt: skip


@dataclass
class Plan:
    """What a run finds done and what it still has to compute."""

    staged: list[dict] = field(default_factory=list)  # part entries already under the prefix
    reused: list[dict] = field(default_factory=list)  # part entries rewritten from other tables
    skip: dict[str, frozenset[str]] = field(default_factory=dict)  # shard file name -> keys done
    todo: list[dict] = field(default_factory=list)  # shard manifest entries to read
    keys: set[str] = field(default_factory=set)  # keys of the staged parts

    @property
    def staged_rows(self) -> int:
        return sum(p["rows"] for p in self.staged)

    @property
    def reused_rows(self) -> int:
        return sum(p["rows"] for p in self.reused)


def plan(prefix: Location, shards: list[dict], metadata: Mapping[str, str], row_group_size: int) -> Plan:
    """Finds the staged and reusable parts for ``shards`` (the shard manifest's entries) of the
    run whose table metadata is ``metadata``; rewrites the reusable ones under ``prefix``."""
    by_stem = {shard_stem(s["path"]): s for s in shards}
    if len(by_stem) != len(shards):
        raise ValueError("shard file names repeat across splits: parts could not name their shard")
    result = Plan()
    staged = _staged(prefix, by_stem, metadata)
    for stem, shard in by_stem.items():
        mine = staged.get(stem, [])
        keys = [k for _, ks in mine for k in ks]
        if len(set(keys)) != len(keys) or len(keys) > int(shard["samples"]):
            for path, _ in mine:  # overlapping parts: this shard is computed again
                delete(prefix.join(path))
            mine, keys = [], []
        result.staged += [part_entry(path, shard, len(ks)) for path, ks in mine]
        result.keys.update(keys)
        if len(keys) == int(shard["samples"]):
            continue
        if keys:
            result.skip[posixpath.basename(shard["path"])] = frozenset(keys)
        result.todo.append(shard)
    if result.todo and metadata.get("compute_sha256"):
        found = _reusable(prefix, result.todo, metadata)
        for shard in list(result.todo):
            sources = found.get((shard["path"], shard.get("sha256")))
            if sources is None:
                continue
            result.reused += _rewrite(prefix, shard, sources, metadata, row_group_size)
            result.todo.remove(shard)
    return result


def _staged(prefix: Location, by_stem: Mapping[str, dict], metadata: Mapping[str, str]) -> dict:
    """{shard stem: [(part path, its keys)]} for the usable parts under ``prefix``; anything else
    there (a part of another run or other code, an unreadable file, a temporary file) is deleted."""
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for full in list_files(prefix):
        rel = posixpath.relpath(full, prefix.path)
        name = posixpath.basename(rel)
        if rel in (MANIFEST, TABLE_STATS_NAME):
            continue
        stem = name.rsplit("-", 1)[0] if name.endswith(".parquet") else None
        shard = by_stem.get(stem) if stem else None
        keys = _part_keys(prefix.join(rel), metadata) if shard is not None else None
        if keys is None or rel.split("/", 1)[0] != f"split={shard['split']}":
            delete(Location(prefix.fs, full, full))
            continue
        found.setdefault(stem, []).append((rel, keys))
    return found


def _part_keys(loc: Location, metadata: Mapping[str, str]) -> list[str] | None:
    """The keys of a staged part, or None when it is unreadable or was made by another run."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            meta = table_metadata(pf.schema_arrow)
            if any(meta.get(k) != metadata.get(k) for k in ("run_id", "compute_sha256")):
                return None
            return pf.read(columns=["key"]).column("key").to_pylist()
    except (OSError, pa.ArrowException, ValueError):
        return None


def _reusable(prefix: Location, todo: list[dict], metadata: Mapping[str, str]) -> dict:
    """{(shard path, sha256): (table URI, [its part entries for that shard])} from the other
    committed tables beside ``prefix`` made by the same computation; the newest table wins."""
    wanted = {(s["path"], s["sha256"]): int(s["samples"]) for s in todo if s.get("sha256")}
    if not wanted:
        return {}
    tables = [(other, manifest) for other, manifest in sibling_tables(prefix)
              if all(manifest.get("metadata", {}).get(k) == metadata.get(k) for k in REUSE_KEYS)]  # fmt: skip
    found: dict = {}
    for other, manifest in tables:
        groups: dict = {}
        for part in manifest.get("parts", []):
            if part.get("shard") and part.get("shard_sha256"):
                groups.setdefault((part["shard"], part["shard_sha256"]), []).append(part)
        for ident, parts in groups.items():
            if ident in wanted and ident not in found and sum(p["rows"] for p in parts) == wanted[ident]:
                found[ident] = (other, parts)
    return found


def _rewrite(prefix: Location, shard: dict, source: tuple, metadata: Mapping[str, str],
             row_group_size: int) -> list[dict]:  # fmt: skip
    """Copies another table's parts for ``shard`` under ``prefix`` with this table's metadata."""
    other, parts = source
    written = []
    for part in parts:
        loc = other.join(part["path"])
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.read_table(f)
        n_styles, style_dim = json.loads(table_metadata(table.schema)["shape"])
        table = table.replace_schema_metadata(schema_metadata(TABLE_FORMAT, n_styles, style_dim, metadata))
        path = part_path(shard["split"], shard["path"])
        write_part(table, prefix.join(path), row_group_size)
        written.append(part_entry(path, shard, table.num_rows, reused_from=other.uri))
    log.info("reused %d rows of %s from %s", sum(p["rows"] for p in written), shard["path"], other.uri)
    return written
