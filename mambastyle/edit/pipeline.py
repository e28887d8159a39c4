"""Bulk edits on Ray Data: selected rows of a latent table -> edited images + an edits table.

The selection (an SQL condition, run by DuckDB) is streamed: read tasks run it on one unit
of the latent table at a time (a source shard's rows, see :mod:`mambastyle.edit.units`) and
pass (key, split, w_plus) on to an actor pool (the generator loaded once per actor; GPUs when
asked) that applies every (edit, strength) with :func:`mambastyle.edit.core.apply_edits`,
renders the results and writes them per unit: the images (WebDataset tar shards, or one PNG
per image for small jobs), then one Parquet part per split. The driver holds the parts'
descriptions only, never the keys or codes; it checks the count (every selected row edited at
every strength) and writes ``_manifest.json``, last. The table lives at
``{root}/edits/{run}`` with ``run`` derived from its inputs; a re-run keeps what a killed run
of the same inputs wrote, reuses units an earlier table made the same way, and edits the rest.

Its length is the job in one place: selection checks, the read task, the actor, the per-unit
writer, the Ray Data wiring, the commit, and reading the rendered images back.

Edits table columns: ``key``, ``edit``, ``strength`` (float64; the key of a row is the
triple), ``w_plus`` (the edited code), ``score`` (a fitted direction's predicted attribute
for the edited code, else null) and ``image`` (the rendered image's URI: ``{tar}#{member}``
for shards, the PNG's URI for a folder); ``split`` is the Hive partition.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mambastyle.edit.core import Edit, apply_edits, fused_edits, png_bytes, render, strength_label
from mambastyle.latents import (
    EDITS_CLUSTER_BY,
    EDITS_FORMAT,
    MANIFEST,
    LatentTable,
    LatentTableError,
    commit,
    part_metadata,
    remove_unlisted,
    schema_metadata,
    write_part,
)
from mambastyle.runtime import TorchThread, actor_device, root_cause, worker_options
from mambastyle.storage import Location, StorageOptions, delete, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)


class EditError(RuntimeError):
    """The edit job cannot run or its result is incomplete (the message names the cause)."""


@dataclass(frozen=True)
class EditJob:
    """Everything the actors and the sink need (plain and picklable)."""

    out: str  # the edits table's prefix
    options: StorageOptions
    generator: object  # GeneratorParams
    edits: tuple[Edit, ...]
    shape: tuple[int, int]  # (n_styles, style_dim)
    batch_size: int  # images per generator forward
    num_actors: int
    use_gpu: bool
    output: str  # "shards" | "folder"
    images_per_shard: int
    row_group_size: int
    rows_per_file: int
    metadata: dict
    cpus_per_actor: int = 1
    fuser: str | None = None  # fuser mode: the fuser checkpoint (encoder + fuser)
    root: str | None = None  # fuser mode: the storage root whose shards/ hold the source faces
    table: str = ""  # the latent table's prefix (read tasks open its parts)
    where: str = ""  # the selection: one SQL condition over the latent table's columns
    unit_sha256: tuple = ()  # (unit name, content sha256 or None) of the table's units
    precision: str = "fp32"  # fp32 | bf16 (autocast; see models.inversion.inference_precision)

    @property
    def per_row(self) -> int:
        return sum(len(e.strengths) for e in self.edits)

    @property
    def rows_per_call(self) -> int:
        """Selected rows per actor call: a tar's worth of images, and at least one model batch."""
        return max(-(-self.batch_size // self.per_row), self.images_per_shard // self.per_row, 1)


def edits_schema(n_styles: int, style_dim: int, metadata: dict) -> pa.Schema:
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("edit", pa.string(), nullable=False),
        pa.field("strength", pa.float64(), nullable=False),
        pa.field("w_plus", pa.list_(pa.float32(), n_styles * style_dim), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("image", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata=schema_metadata(EDITS_FORMAT, n_styles, style_dim, metadata))


def select(table: LatentTable, where, sources: bool = False, limit: int | None = None) -> pa.Table:
    """The rows to edit as (key, split, w_plus), ordered by key; with ``sources``, also the
    ``shard`` each face came from, ordered by (split, shard, key) so a block reads few shards.

    ``where`` is an SQL condition over the table's columns (DuckDB; the table is ``latents``)
    or a pyarrow compute expression; ``limit`` keeps the first rows only (in that order).

    Raises:
        EditError: an SQL error or unknown column (named by DuckDB), no matching rows, or
            repeated keys.
    """
    import pyarrow.compute as pc

    columns = ["key", "split", "w_plus", *(["shard"] if sources else [])]
    order = ["split", "shard", "key"] if sources else ["key"]
    try:
        if isinstance(where, pc.Expression):
            rows = table.to_table(filter=where, columns=columns)
            rows = rows.take(pc.sort_indices(rows, [(c, "ascending") for c in order]))
            rows = rows if limit is None else rows.slice(0, limit)
        else:
            if not str(where).strip():
                raise EditError("the selection is empty: give an SQL condition (e.g. \"split = 'test'\")")
            rows = table.select(str(where), columns, order, limit)
    except LatentTableError as exc:
        raise EditError(f"selection {where!r}: {exc}") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise EditError(f"selection {where!r}: {exc}") from None
    if rows.num_rows == 0:
        raise EditError(f"selection {where!r} matches no rows of {table.prefix.uri}: nothing to edit")
    keys = rows.column("key")
    if pc.count_distinct(keys).as_py() != rows.num_rows:
        raise EditError(f"selection {where!r}: repeated keys in {table.prefix.uri}; keys must be unique")
    return rows


def load_fuser_model(uri: str, options: StorageOptions | None, device="cpu"):
    """The ``FuserModel`` (encoder + fuser) of a fuser checkpoint, in eval mode."""
    from mambastyle.checkpoints import checkpoint_source, load_fuser
    from mambastyle.models.fuser import FuserModel

    encoder, fuser, _ = load_fuser(checkpoint_source(uri, options), device=device)
    return FuserModel(encoder, fuser).eval()


def read_sources(
    root: Location, keys: Sequence[str], splits: Sequence[str], shards: Sequence[str], options=None
) -> np.ndarray:
    """The aligned faces of table rows from the prepare stage's shards (``{root}/shards/{split}/{shard}``,
    member ``{key}.png``): (n, H, W, 3) uint8 in the order of ``keys``; each shard is read once."""
    uris = [f"{root.join('shards', split, shard).uri}#{key}.png" for key, split, shard in
            zip(keys, splits, shards, strict=True)]  # fmt: skip
    try:
        return np.stack(read_images(uris, options))
    except FileNotFoundError as exc:
        raise EditError(f"fuser mode: a source shard is missing ({exc}); the table's faces must be under "
                        f"{root.join('shards').uri}") from None  # fmt: skip


class Editor:
    """Ray Data actor: loads the generator (and in fuser mode the encoder and fuser) once;
    edits and renders blocks of selected rows."""

    def __init__(self, job: EditJob):
        self.thread = TorchThread()
        self.thread.run(self._load, job)

    def _load(self, job: EditJob) -> None:
        from mambastyle.generate import resolve_generator
        from mambastyle.models.inversion import warn_if_emulated

        self.job = job
        self.device = actor_device(job.use_gpu, job.cpus_per_actor)
        warn_if_emulated("edit.precision", job.precision, self.device)
        gp = job.generator
        self.generator = resolve_generator(
            gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples, self.device, job.options
        )
        self.model = None if job.fuser is None else load_fuser_model(job.fuser, job.options, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.thread.run(self._edit_and_write, batch)

    def _edit_and_write(self, batch: pa.Table) -> pa.Table:
        results = []
        if batch.num_rows:
            from mambastyle.models.inversion import inference_precision

            with inference_precision(self.device, self.job.precision):
                rows = edit_rows(batch, self.job, self.generator, self.model)
            results = write_units(rows, self.job)
        return pa.table({"result": pa.array([json.dumps(r) for r in results], pa.string())})


def read_units(batch: pa.Table, job: EditJob) -> pa.Table:
    """Read task: the selected rows (key, split, w_plus[, shard], unit) of the units in
    ``batch`` (unit, its latent parts, the keys already edited), each unit's rows by key."""
    import pyarrow.dataset as pads

    from mambastyle.edit.units import skip_filter
    from mambastyle.latents import sql_connection, where_clause

    prefix = resolve(job.table, job.options)
    columns = ["key", "split", "w_plus", *(["shard"] if job.fuser else [])]
    partitioning = pads.partitioning(pa.schema([("split", pa.string())]), flavor="hive")
    out = []
    for item in batch.to_pylist():
        paths = [prefix.join(p).path for p in item["parts"]]
        dataset = pads.dataset(paths, format="parquet", filesystem=prefix.fs, partitioning=partitioning,
                               partition_base_dir=prefix.path)  # fmt: skip
        con = sql_connection({"latents": dataset})
        try:
            cond = where_clause(con, "latents", job.where)
            rows = con.sql(
                f"SELECT {', '.join(columns)} FROM latents WHERE {cond} ORDER BY key"
            ).to_arrow_table()
        finally:
            con.close()
        rows = skip_filter(rows, set(item["done"]))
        out.append(rows.append_column("unit", pa.array([item["unit"]] * rows.num_rows, pa.string())))
    return pa.concat_tables(out)


def edit_rows(batch: pa.Table, job: EditJob, generator, model=None) -> pa.Table:
    """Selected rows (key, split, w_plus[, shard]) -> one row per (key, edit, strength) with the
    edited code, its score, the PNG bytes and the image's member/file name. With ``model``
    (fuser mode) each row's face is re-encoded from its shard and rendered with the fuser."""
    n_styles, style_dim = job.shape
    keys, splits = batch.column("key").to_pylist(), batch.column("split").to_pylist()
    units = batch.column("unit").to_pylist() if "unit" in batch.column_names else [""] * len(keys)
    if model is None:
        col = batch.column("w_plus").combine_chunks()
        w = col.values.to_numpy(zero_copy_only=False).reshape(-1, n_styles, style_dim)
        edited, index = apply_edits(w, job.edits)
        images = render(generator, edited, job.batch_size)
    else:
        shards = batch.column("shard").to_pylist()
        sources = read_sources(resolve(job.root, job.options), keys, splits, shards, job.options)
        edited, index, images = fused_edits(generator, model, sources, job.edits, job.batch_size)
    scores = np.full(len(index), np.nan, np.float32)
    for e_idx, edit in enumerate(job.edits):
        mine = [i for i, (_, e, _) in enumerate(index) if e == e_idx]
        s = edit.direction.score(edited[mine])
        if s is not None:
            scores[mine] = s
    names, strengths = [], []
    for r, e, s in index:
        edit = job.edits[e]
        strengths.append(edit.strengths[s])
        label = strength_label(edit.strengths[s])
        names.append(
            f"{keys[r]}-{edit.name}-{label}" if job.output == "shards" else f"{edit.name}/{keys[r]}-{label}"
        )
    flat = pa.FixedSizeListArray.from_arrays(pa.array(edited.reshape(-1)), n_styles * style_dim)
    return pa.table(
        {
            "key": pa.array([keys[r] for r, _, _ in index], pa.string()),
            "split": pa.array([splits[r] for r, _, _ in index], pa.string()),
            "edit": pa.array([job.edits[e].name for _, e, _ in index], pa.string()),
            "strength": pa.array(strengths, pa.float64()),
            "w_plus": flat,
            "score": pa.array(scores, pa.float32(), mask=np.isnan(scores)),
            "png": pa.array([png_bytes(img) for img in images], pa.binary()),
            "name": pa.array(names, pa.string()),
            "unit": pa.array([units[r] for r, _, _ in index], pa.string()),
        }
    )


class UnitWriter:
    """One call's output for one unit, streamed: images go out as they come (a tar is
    published whenever it holds ``images_per_shard`` images; folder mode writes each PNG at
    once). The table rows (without image bytes) are kept and written, one Parquet part per
    split, by :meth:`close`: after the images they point at, so a part present is complete."""

    def __init__(self, job: EditJob, unit: str):
        from mambastyle.edit.units import call_stem

        self.job, self.unit, self.stem = job, unit, call_stem(unit)
        self.prefix = resolve(job.out, job.options)
        self.rows: list[pa.Table] = []
        self.files: list[dict] = []
        self.members: list[tuple[str, bytes]] = []

    def _tar_path(self) -> str:
        return f"images/{self.stem}-{len(self.files):04d}.tar"

    def add(self, block: pa.Table) -> None:
        names, pngs = block.column("name").to_pylist(), block.column("png").to_pylist()
        meta = block.select(["key", "edit", "strength"]).to_pylist()
        uris = []
        for name, data, m in zip(names, pngs, meta, strict=True):
            if self.job.output == "shards":
                uris.append(f"{self.prefix.join(self._tar_path()).uri}#{name}.png")
                self.members += [
                    (f"{name}.png", data),
                    (f"{name}.json", json.dumps(m, sort_keys=True).encode()),
                ]
                if len(self.members) >= 2 * self.job.images_per_shard:
                    self._flush()
            else:
                path = f"images/{name}.png"
                write_bytes(self.prefix.join(path), data, durable=False)
                uris.append(self.prefix.join(path).uri)
                self.files.append({"path": path, "images": 1, "bytes": len(data)})
        self.rows.append(
            block.drop_columns(["png", "name"]).append_column("image", pa.array(uris, pa.string()))
        )

    def _flush(self) -> None:
        from mambastyle.data.shards import tar_bytes

        path = self._tar_path()
        data = tar_bytes(self.members)
        write_bytes(self.prefix.join(path), data)
        self.files.append({"path": path, "images": len(self.members) // 2, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
        self.members = []

    def close(self) -> dict:
        """Publishes the last tar, then the parts; returns what was written."""
        if self.members:
            self._flush()
        rows = pa.concat_tables(self.rows)
        part_schema = edits_schema(*self.job.shape, self.job.metadata)
        unit_sha = dict(self.job.unit_sha256).get(self.unit)
        written = []
        splits = rows.column("split").to_pylist()
        for split in sorted(set(splits)):
            idx = pa.array([i for i, s in enumerate(splits) if s == split])
            part = rows.take(idx).drop_columns(["split"]).select(part_schema.names).cast(part_schema)
            path = f"split={split}/{self.stem}.parquet"
            write_part(part, self.prefix.join(path), self.job.row_group_size, sort_by=EDITS_CLUSTER_BY)
            written.append({"path": path, "split": split, "rows": part.num_rows, "unit": self.unit,
                            "unit_sha256": unit_sha})  # fmt: skip
        return {"parts": written, "files": self.files}


def write_units(rows: pa.Table, job: EditJob) -> list[dict]:
    """One call's edited rows, written per unit (see :class:`UnitWriter`)."""
    keys = rows.column("key").to_pylist()
    if len(keys) != len(set(keys)) * job.per_row:  # every key at every strength, once
        raise EditError(f"an edit call made {len(keys)} rows for {len(set(keys))} keys x {job.per_row}")
    units = rows.column("unit").to_pylist()
    results = []
    for unit in sorted(set(units)):
        writer = UnitWriter(job, unit)
        writer.add(rows.filter(pa.array([u == unit for u in units])).drop_columns(["unit"]))
        results.append(writer.close())
    return results


def run_edits(job: EditJob, table: LatentTable, stats=None) -> dict:
    """Edits what is missing of ``job.where``'s selection from ``table`` on the connected Ray
    and commits the edits table; returns its manifest. Staged and reusable work is found first
    (:func:`mambastyle.edit.units.plan`); ``stats`` (when given) gets the counts."""
    from mambastyle.edit import units as unitwork

    prefix = resolve(job.out, job.options)
    delete(prefix.join(MANIFEST))  # readers trust only a manifest: none while parts change
    try:
        selected = table.count(job.where)
    except LatentTableError as exc:
        raise EditError(f"selection {job.where!r}: {exc}") from None
    if selected == 0:
        raise EditError(f"selection {job.where!r} matches no rows of {table.prefix.uri}: nothing to edit")
    work = unitwork.plan(prefix, unitwork.units(table), job.metadata, job.output, job.row_group_size)
    items = [{"unit": u.name, "parts": list(u.parts), "done": sorted(work.done.get(u.name, ()))}
             for u in work.todo]  # fmt: skip
    results = _edit(job, items) if items else []
    computed = [p for r in results for p in r["parts"]]
    parts = work.staged + work.reused + computed
    files = sorted(work.staged_files + work.reused_files + [f for r in results for f in r["files"]],
                   key=lambda f: f["path"])  # fmt: skip
    expected = selected * job.per_row
    if sum(p["rows"] for p in parts) != expected:
        raise EditError(
            f"incomplete edits table: {sum(p['rows'] for p in parts)} rows for the {expected} expected "
            f"({selected} selected x {job.per_row} edits and strengths); nothing committed"
        )
    if stats is not None:
        stats.inputs, stats.written = selected, expected
        stats.computed = sum(p["rows"] for p in computed) // job.per_row
        stats.reused = selected - stats.computed
    sources: dict[str, int] = {}
    for p in work.reused:
        sources[p["reused_from"]] = sources.get(p["reused_from"], 0) + p["rows"]
    extra = {
        "images": {
            "output": job.output,
            "count": sum(f["images"] for f in files),
            "files": len(files),
            "bytes": sum(f["bytes"] for f in files),
        },  # fmt: skip
        "shards": files if job.output == "shards" else [],
        "selected": selected,
        "edits": [e.describe() for e in job.edits],
        "reused": {"rows": work.rows(work.reused), "from": sources},
        "resumed": work.rows(work.staged),
        "computed": sum(p["rows"] for p in computed),
    }
    manifest = commit(prefix, parts, part_metadata(prefix, parts), extra, fmt=EDITS_FORMAT)
    remove_unlisted(prefix, [p["path"] for p in parts] + [f["path"] for f in files])
    return manifest


def _edit(job: EditJob, items: list[dict]) -> list[dict]:
    """The Ray Data job over the units in ``items``: what each call wrote."""
    import ray

    # from_items builds its blocks here (no remote tasks whose CPUs the resource view could
    # still count as busy when the job starts): one block, so one read task, per unit
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Reading asks for no CPU slot: the actors hold them all on a CPU machine (as in invert).
    reads = ray.data.TaskPoolStrategy(size=None if job.use_gpu else job.num_actors)
    ds = ds.map_batches(read_units, fn_kwargs={"job": job}, batch_size=1, batch_format="pyarrow", num_cpus=0,
                        compute=reads)  # fmt: skip
    ds = ds.map_batches(
        Editor,
        fn_constructor_kwargs={"job": job},
        batch_size=job.rows_per_call,  # rows in; each gives per_row images, rendered batch_size at a time
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=job.num_actors),
        num_gpus=1 if job.use_gpu else 0,
        num_cpus=1 if job.use_gpu else job.cpus_per_actor,
        **worker_options(),
    )
    try:
        return [json.loads(row["result"]) for row in ds.iter_rows()]
    except Exception as exc:
        raise EditError(f"edit job failed: {root_cause(exc)}") from exc


# --------------------------------------------------------------------------- pictures


def read_images(uris: Sequence[str], options: StorageOptions | None = None) -> list[np.ndarray]:
    """Decodes images by URI (``{tar}#{member}`` or a PNG file); each tar is read once."""
    from PIL import Image

    wanted: dict[str, set[str]] = {}
    for uri in uris:
        if "#" in uri:
            tar, member = uri.rsplit("#", 1)
            wanted.setdefault(tar, set()).add(member)
    found: dict[str, bytes] = {}
    for tar_uri, members in wanted.items():
        with tarfile.open(fileobj=io.BytesIO(read_bytes(resolve(tar_uri, options))), mode="r:") as tar:
            for info in tar:  # read into memory only: nothing is extracted to disk
                if info.isfile() and info.name in members:
                    found[f"{tar_uri}#{info.name}"] = tar.extractfile(info).read()
    out = []
    for uri in uris:
        data = found.get(uri) if "#" in uri else read_bytes(resolve(uri, options))
        if data is None:
            raise EditError(f"{uri}: image not found")
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out
