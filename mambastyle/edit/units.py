"""Resumable, incremental edits: the edit job's units of work and the work found done.

A unit is the rows of one source shard in the latent table (the latent parts naming that
shard; a table without shard names: each latent part alone). Read tasks run the selection on
one unit's parts and actors write each call's output per unit, images first, then one Parquet
part per split named ``split={split}/{unit}-{call}.parquet`` (tars: ``images/{unit}-{call}-
{n}.tar``), so a part present is a part whose images are all written.

Before the job, two kinds of earlier work are found:

- **staged**: the parts a killed run of the same run id left under the edits prefix; their keys
  are not edited again (a part from another run is deleted, and so are files no part refers to,
  at the commit).
- **reused**: for a unit nothing is staged for, the parts of another committed edits table made
  the same way (same selection, edits, generator and settings: ``edit_sha256``) from a unit of
  the same content (``unit_sha256``: the latent rows' computation and their shard's sha256);
  its images are copied and its parts rewritten to point at the copies.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tarfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mambastyle.latents import (
    EDITS_CLUSTER_BY,
    EDITS_FORMAT,
    LatentTable,
    schema_metadata,
    sibling_tables,
    table_metadata,
    write_part,
)
from mambastyle.storage import Location, delete, list_files, read_bytes, write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    name: str  # file-name prefix of its outputs
    parts: tuple[str, ...]  # latent part paths below the table's prefix
    sha256: str | None  # content identity (None: not reusable)


def units(table: LatentTable) -> list[Unit]:
    """The latent table's units: one per source shard, else one per part."""
    meta = table.metadata
    groups: dict[str, list[dict]] = {}
    for part in table.manifest["parts"]:
        if part.get("shard"):
            name = posixpath.basename(part["shard"]).removesuffix(".tar")
        else:
            name = f"{part['split']}_{posixpath.basename(part['path']).removesuffix('.parquet')}"
        groups.setdefault(name.replace("-", "_"), []).append(part)
    out = []
    for name, parts in sorted(groups.items()):
        first = parts[0]
        ident = None
        if meta.get("compute_sha256") and first.get("shard_sha256"):
            text = f"{meta['compute_sha256']}/{first['shard']}/{first['shard_sha256']}"
            ident = hashlib.sha256(text.encode()).hexdigest()
        out.append(Unit(name, tuple(p["path"] for p in parts), ident))
    return out


def call_stem(unit: str) -> str:
    """The name stem of one call's outputs for ``unit``: random, so a resumed run never
    overwrites what a killed run already wrote."""
    return f"{unit}-{uuid.uuid4().hex[:12]}"


def unit_of(path: str) -> str:
    """``split=test/train_000003-3fa2...parquet`` or ``images/train_000003-3fa2...-0001.tar`` ->
    ``train_000003``."""
    return posixpath.basename(path).split("-", 1)[0]


@dataclass
class Plan:
    staged: list[dict] = field(default_factory=list)  # part entries already under the prefix
    staged_files: list[dict] = field(default_factory=list)  # their images' files
    reused: list[dict] = field(default_factory=list)
    reused_files: list[dict] = field(default_factory=list)
    done: dict[str, set[str]] = field(default_factory=dict)  # unit -> keys edited (staged)
    todo: list[Unit] = field(default_factory=list)

    def rows(self, parts: list[dict]) -> int:
        return sum(p["rows"] for p in parts)


def plan(prefix: Location, all_units: list[Unit], metadata: Mapping[str, str], output: str,
         row_group_size: int) -> Plan:  # fmt: skip
    """Staged and reusable work for ``all_units`` of the run whose metadata is ``metadata``."""
    result = Plan()
    by_name = {u.name: u for u in all_units}
    for rel, keys, table in _staged(prefix, by_name, metadata):
        result.staged.append(_entry(rel, table, by_name[unit_of(rel)]))
        result.done.setdefault(unit_of(rel), set()).update(keys)
        result.staged_files += _files(prefix, table, output)
    fresh = [u for u in all_units if u.name not in result.done]
    result.todo = [u for u in all_units if u.name in result.done] + fresh
    if fresh and metadata.get("edit_sha256"):
        found = _reusable(prefix, {u.sha256 for u in fresh if u.sha256}, metadata["edit_sha256"])
        for unit in fresh:
            if unit.sha256 in found:
                parts, files = _copy(prefix, unit, found[unit.sha256], metadata, output, row_group_size)
                result.reused += parts
                result.reused_files += files
                result.todo.remove(unit)
    return result


def _entry(rel: str, table: pa.Table, unit: Unit, **extra) -> dict:
    split = rel.split("/", 1)[0].removeprefix("split=")
    return {"path": rel, "split": split, "rows": table.num_rows, "unit": unit.name,
            "unit_sha256": unit.sha256, **extra}  # fmt: skip


def _staged(prefix: Location, by_name: Mapping[str, Unit], metadata: Mapping[str, str]):
    """(part path, its keys, its (key, image) table) for the usable parts under ``prefix``;
    unusable ones (another run's, unreadable, of no unit) are deleted."""
    for full in list_files(prefix):
        rel = posixpath.relpath(full, prefix.path)
        if not rel.startswith("split=") or not rel.endswith(".parquet"):
            continue
        table = None
        if unit_of(rel) in by_name:
            try:
                with prefix.fs.open_input_file(full) as f:
                    pf = pq.ParquetFile(f)
                    if table_metadata(pf.schema_arrow).get("run_id") == metadata.get("run_id"):
                        table = pf.read(columns=["key", "image"])
            except (OSError, pa.ArrowException, ValueError):
                table = None
        if table is None:
            delete(Location(prefix.fs, full, full))
            continue
        yield rel, set(table.column("key").to_pylist()), table


def _files(prefix: Location, table: pa.Table, output: str) -> list[dict]:
    """The image files a staged part refers to, described as the job describes what it writes."""
    images = table.column("image").to_pylist()
    base = prefix.uri.rstrip("/") + "/"
    if output == "folder":
        out = []
        for uri in images:
            rel = uri.removeprefix(base)
            size = prefix.fs.get_file_info(prefix.join(rel).path).size
            out.append({"path": rel, "images": 1, "bytes": size})
        return out
    counts: dict[str, int] = {}
    for uri in images:
        rel = uri.rsplit("#", 1)[0].removeprefix(base)
        counts[rel] = counts.get(rel, 0) + 1
    out = []
    for rel, n in sorted(counts.items()):
        data = read_bytes(prefix.join(rel))
        out.append({"path": rel, "images": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return out


def _reusable(prefix: Location, wanted: set[str], edit_sha: str) -> dict[str, tuple[Location, dict, list]]:
    """{unit_sha256: (table prefix, its manifest, its parts of that unit)} from the other
    committed edits tables beside ``prefix`` made the same way; the newest table wins."""
    if not wanted:
        return {}
    tables = [
        (t, m) for t, m in sibling_tables(prefix) if m.get("metadata", {}).get("edit_sha256") == edit_sha
    ]
    found: dict = {}
    for other, manifest in tables:
        for part in manifest.get("parts", []):
            ident = part.get("unit_sha256")
            if ident in wanted and (ident not in found or found[ident][0] is other):
                found.setdefault(ident, (other, manifest, []))[2].append(part)
    return found


def _copy(prefix: Location, unit: Unit, source: tuple, metadata: Mapping[str, str], output: str,
          row_group_size: int) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Another table's parts for ``unit`` and their images, under ``prefix``: images copied,
    parts rewritten with this table's metadata and image URIs."""
    other, manifest, parts = source
    old_base, new_base = other.uri.rstrip("/") + "/", prefix.uri.rstrip("/") + "/"
    stem = call_stem(unit.name)
    renamed: dict[str, str] = {}  # old tar path -> new
    entries, files = [], []
    for part in parts:
        loc = other.join(part["path"])
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.read_table(f)
        uris = table.column("image").to_pylist()
        new_uris = []
        for uri in uris:
            rel, _, member = uri.removeprefix(old_base).partition("#")
            if output == "folder":
                new_rel = rel
                if rel not in renamed:
                    data = read_bytes(other.join(rel))
                    write_bytes(prefix.join(rel), data, durable=False)
                    files.append({"path": rel, "images": 1, "bytes": len(data)})
                    renamed[rel] = rel
            else:
                if rel not in renamed:
                    renamed[rel] = f"images/{stem}-{len(renamed):04d}.tar"
                    data = read_bytes(other.join(rel))
                    write_bytes(prefix.join(renamed[rel]), data)
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                        n = sum(1 for m in tar if m.isfile() and m.name.endswith(".png"))
                    files.append({"path": renamed[rel], "images": n, "bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
                new_rel = renamed[rel]
            new_uris.append(new_base + new_rel + (f"#{member}" if member else ""))
        table = table.set_column(
            table.schema.get_field_index("image"), "image", pa.array(new_uris, pa.string())
        )
        n_styles, style_dim = json.loads(table_metadata(table.schema)["shape"])
        table = table.replace_schema_metadata(schema_metadata(EDITS_FORMAT, n_styles, style_dim, metadata))
        rel = f"split={part['split']}/{stem}{len(entries):02d}.parquet"
        write_part(table, prefix.join(rel), row_group_size, sort_by=EDITS_CLUSTER_BY)
        entries.append(_entry(rel, table, unit, reused_from=other.uri))
    log.info(
        "reused %d edited rows of unit %s from %s", sum(e["rows"] for e in entries), unit.name, other.uri
    )
    return entries, files


def skip_filter(table: pa.Table, done: set[str]) -> pa.Table:
    """``table`` without the rows whose key is in ``done``."""
    if not done:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("key"), pa.array(sorted(done), pa.string()))))
