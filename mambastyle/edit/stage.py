"""The edit stage from params: every edit built (direction files loaded or fitted on the
table), the table checked against the configured generator, the rows selected, the Ray Data
job of :mod:`mambastyle.edit.pipeline` run, and one picture per edit rendered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mambastyle.directions import DirectionError
from mambastyle.edit.core import Edit, apply_edits, fused_edits, render
from mambastyle.edit.pipeline import EditError, EditJob, load_fuser_model, read_sources, run_edits, select
from mambastyle.edit.units import units
from mambastyle.latents import LatentTable, LatentTableError
from mambastyle.locks import writer_lock
from mambastyle.runstats import TABLE_STATS_NAME, RunStats
from mambastyle.storage import Location, StorageOptions, read_bytes, resolve, write_bytes


def edit_grid(
    generator, edit: Edit, w_plus: np.ndarray, batch_size: int = 8, model=None, sources=None
) -> np.ndarray:
    """One picture per edit: a row per code of ``w_plus`` (n, S, D), a column per strength
    (ascending) with the unedited reconstruction in the middle. In fuser mode (``model`` and the
    rows' source faces ``sources``), the faces are re-encoded and rendered with the fuser.

    Rendered here, from the codes, with the function the actors use (so it shows what they
    wrote, up to float rounding) in a fixed batch order: the picture is the same in every run,
    whereas the actors' batches depend on how Ray groups rows.
    """
    from mambastyle.visual import make_grid

    columns = [*sorted(s for s in edit.strengths if s < 0), 0.0, *sorted(s for s in edit.strengths if s > 0)]
    if not edit.direction.identity_at_zero:  # absolute GANSpace: 0 is a coordinate, not the original
        columns = sorted(edit.strengths)
    one = Edit(edit.name, edit.direction, tuple(columns), edit.layers)
    if model is None:
        edited, index = apply_edits(w_plus, [one])  # strength-major: reorder to a row per code
        images = render(generator, edited, batch_size)
    else:
        _, index, images = fused_edits(generator, model, sources, [one], batch_size)
    order = sorted(range(len(index)), key=lambda i: (index[i][0], index[i][2]))
    return make_grid(images[order], ncols=len(columns))


def build_edit(entry, table: LatentTable, options: StorageOptions, table_name: str = "") -> Edit:
    """An :class:`Edit` from one ``edit.edits`` entry: loads its direction file, or fits it on
    the table's rows that ``fit_where`` selects (``table_name``: how the fit's record names
    the table, default its URI)."""
    from mambastyle.directions import load_direction, load_ganspace

    n_styles, style_dim = table.shape
    try:
        if entry.source == "interfacegan":
            direction = load_direction(entry.uri, n_styles, style_dim, options)
        elif entry.source == "ganspace":
            direction = load_ganspace(
                entry.uri, entry.component, n_styles, style_dim, options, absolute=entry.absolute
            )
        else:
            labels = read_labels(entry.labels, options) if entry.labels else None
            direction = fit_direction_from_table(
                table, entry.column, entry.fit_where, entry.space, table_name, labels
            )
        return Edit(entry.name, direction, entry.strengths, entry.layers)
    except DirectionError as exc:
        raise EditError(f"edit {entry.name!r}: {exc}") from None


def read_labels(uri: str, options: StorageOptions | None = None) -> pa.Table:
    """A user's labels to join to a latent table by ``key``: a ``.parquet`` or ``.csv`` file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        data = read_bytes(resolve(uri, options))
        if uri.endswith(".parquet"):
            labels = pq.read_table(io.BytesIO(data))
        elif uri.endswith(".csv"):
            labels = pacsv.read_csv(io.BytesIO(data))
        else:
            raise DirectionError(f"{uri}: labels must be a .parquet or .csv file")
    except FileNotFoundError:
        raise DirectionError(f"{uri}: no such labels file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DirectionError(f"{uri}: unreadable labels ({exc})") from None
    if "key" not in labels.schema.names:
        raise DirectionError(f"{uri}: labels need a 'key' column (the latent table's keys)")
    keys = labels.column("key").cast(pa.string())
    if pa.compute.count_distinct(keys).as_py() != labels.num_rows:
        raise DirectionError(f"{uri}: repeated keys in the labels")
    labels = labels.set_column(labels.schema.get_field_index("key"), "key", keys)
    return labels.replace_schema_metadata({"sha256": hashlib.sha256(data).hexdigest(), "uri": uri})


def fit_direction_from_table(
    table: LatentTable,
    column: str,
    where: str,
    space: str = "W",
    table_name: str = "",
    labels: pa.Table | None = None,
):
    """Fits a direction for ``column`` on the rows ``where`` selects (see ``fit_direction``).

    ``column`` is a numeric or boolean column of the table, or of ``labels`` (a table with a
    ``key`` column, joined to the latent table by key; ``where`` sees both; see
    :func:`read_labels`).
    """
    from mambastyle.directions import fit_direction

    source = labels.schema if labels is not None else table.dataset.schema
    if column in ("key", "split", "w_plus") or column not in source.names:
        usable = [f.name for f in source if f.name != "key" and (pa.types.is_floating(f.type)
                  or pa.types.is_integer(f.type) or pa.types.is_boolean(f.type))]  # fmt: skip
        where_from = "the labels" if labels is not None else "the table"
        raise DirectionError(
            f"column {column!r} cannot be fitted: numeric or boolean columns of {where_from} are {usable}"
        )
    typ = source.field(column).type
    if not (pa.types.is_floating(typ) or pa.types.is_integer(typ) or pa.types.is_boolean(typ)):
        raise DirectionError(f"column {column!r} is {typ}: only numeric or boolean columns can be fitted")
    import duckdb

    from mambastyle.latents import LatentTableError, sql_connection, where_clause

    name = table.name
    rows_of = name if labels is None else f"{name} JOIN labels USING (key)"
    value = f'"{column}"' if labels is None else f'labels."{column}"'  # a column checked above
    con = sql_connection({name: table.dataset, **({"labels": labels} if labels is not None else {})})
    try:
        cond = where_clause(con, rows_of, where)
        sql = f"SELECT {name}.w_plus, {value} AS value FROM {rows_of} WHERE {cond} ORDER BY key"
        rows = con.sql(sql).to_arrow_table()
    except LatentTableError as exc:
        raise DirectionError(f"fit rows {where!r}: {exc}") from None
    except duckdb.Error as exc:
        raise DirectionError(f"fit rows {where!r}: SQL error: {exc}") from None
    finally:
        con.close()
    provenance = {"column": column, "where": where, "table": table_name or table.prefix.uri,
                  "table_run_id": table.metadata.get("run_id")}  # fmt: skip
    if labels is not None:
        meta = {k.decode(): v.decode() for k, v in (labels.schema.metadata or {}).items()}
        provenance["labels"] = meta.get("uri", "")
        provenance["labels_sha256"] = meta.get("sha256", "")
    return fit_direction(table.w_plus(rows), rows.column("value").to_pylist(), space, provenance=provenance)


def run_id(
    table: LatentTable, where: str, edits: Sequence[Edit], generator_sha256: str, settings: dict
) -> tuple[str, str]:
    """(the run id, the ``edit_sha256`` of how rows are edited: the same for two runs whose
    units of equal content can be exchanged)."""
    described = [{k: v for k, v in e.describe().items() if k != "fit"} for e in edits]
    how = hashlib.sha256(json.dumps([where, described, generator_sha256, settings], sort_keys=True).encode())
    # the source by its run id (its inputs) and counts: its part names vary between runs
    source = [table.metadata["run_id"], table.manifest["rows"], table.manifest["splits"]]
    h = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    h.update(how.hexdigest().encode())
    return f"run-{h.hexdigest()[:16]}", how.hexdigest()


@dataclass
class EditResult:
    manifest: dict
    prefix: Location
    edits: list[Edit]
    grids: dict[str, np.ndarray]


def edit_from_params(params, table_uri: str | None = None, ray_connect: bool = True) -> EditResult:
    """The edit stage from validated params: opens the latent table (``table_uri``, else
    ``edit.table``), checks it against the configured generator, builds every edit (fitting
    directions), selects the rows, runs the job and commits ``{root}/edits/{run}``; then
    renders one grid per edit from the written images.

    Everything that can be wrong with the inputs (table, SQL, columns, direction files and
    shapes, strengths, an empty selection) is checked before anything is written.
    """
    from mambastyle.directions import save_direction
    from mambastyle.generate import resolve_generator

    stats, t0 = RunStats("edit"), time.perf_counter()
    ep, gp = params.edit, params.generator
    options = params.storage.options()
    root = resolve(params.storage.root, options)
    uri = table_uri or ep.table
    if uri is None:
        raise EditError("no latent table: set edit.table or run the invert stage first")
    g = resolve_generator(
        gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples, options=options
    )
    table, generator_sha = open_for_generator(uri, g, options)
    fuser_uri = fuser_checkpoint(params, table) if ep.mode == "fuser" else None
    edits = [build_edit(entry, table, options, uri) for entry in ep.edits]
    # the first rows (by key) for the pictures; checks the selection before anything is written
    shown = select(table, ep.where, sources=fuser_uri is not None, limit=ep.grid_samples)
    # inputs are valid: from here on things are written
    for e in edits:
        if e.direction.source == "fit":
            name = f"{e.name}-{e.direction.sha256[:12]}.npy"
            save_direction(e.direction, root.join("edits", "directions", name).uri, options)
    job = _job(params, root, table, uri, edits, generator_sha, fuser_uri)
    if ray_connect:
        from mambastyle.runtime import connect_ray

        connect_ray(params.ray.address, params.ray.num_cpus, params.ray.num_gpus)
    if not job.use_gpu:
        job = dataclasses.replace(job, cpus_per_actor=cpus_per_actor(job.num_actors))
    stats.seconds["select_and_load"] = time.perf_counter() - t0
    run = job.metadata["run_id"]
    with writer_lock(params.storage.root, options, f"edit {run}"), stats.phase("render_and_commit"):
        # inputs are selected rows; written counts their edited rows (one per edit and strength)
        manifest = run_edits(job, table, stats)
    write_bytes(root.join("edits", run, TABLE_STATS_NAME), stats.to_json(), durable=False)
    model = sources = None
    if fuser_uri is not None:
        model = load_fuser_model(fuser_uri, options)
        sources = read_sources(
            root, *(shown.column(c).to_pylist() for c in ("key", "split", "shard")), options
        )
    from mambastyle.models.inversion import inference_precision

    with inference_precision("cpu", ep.precision):  # as the actors render (on the driver's CPU)
        grids = {e.name: edit_grid(g, e, table.w_plus(shown), ep.batch_size, model, sources) for e in edits}
    return EditResult(manifest, root.join("edits", job.metadata["run_id"]), edits, grids)


def cpus_per_actor(num_actors: int) -> int:
    """Threads for each of ``num_actors`` CPU actors of the connected Ray: its CPUs shared out,
    at most one node's worth (an actor runs on one node). The generator's forward scales with
    threads, and one actor per CPU would hold a generator's activations per CPU."""
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(int(max(nodes, default=1)), total // num_actors))


def open_for_generator(uri: str, generator, options: StorageOptions) -> tuple[LatentTable, str]:
    """The latent table at ``uri``, refused unless its codes were inverted for ``generator``;
    and the generator's sha256."""
    from mambastyle.checkpoints import state_sha256
    from mambastyle.latents import open_table

    generator_sha = state_sha256(generator)
    try:
        table = open_table(uri, options)
    except LatentTableError as exc:
        raise EditError(str(exc)) from None
    if table.metadata["generator_sha256"] != generator_sha:
        raise EditError(
            f"{table.prefix.uri}: its codes were inverted for generator "
            f"{table.metadata['generator_sha256'][:12]}..., not the configured one ({generator_sha[:12]}...)"
        )
    return table, generator_sha


def _job(params, root: Location, table: LatentTable, uri: str, edits: list[Edit], generator_sha: str,
         fuser_uri: str | None) -> EditJob:  # fmt: skip
    """The job for these inputs, under ``{root}/edits/{run id}``."""
    from mambastyle import __version__
    from mambastyle.models.inversion import precision_tag

    ep, gp = params.edit, params.generator
    fuser_sha = table.metadata.get("fuser_sha256") if fuser_uri else None
    settings = {"output": ep.output, "images_per_shard": ep.images_per_shard, "generator": gp.identity(),
                "mode": ep.mode, "fuser": fuser_sha, **precision_tag(ep.precision)}  # fmt: skip
    run, how = run_id(table, ep.where, edits, generator_sha, settings)
    metadata = {
        "edit_sha256": how,
        "generator_sha256": generator_sha,
        "source_table": uri,
        "source_run_id": table.metadata.get("run_id", ""),
        "edits": json.dumps([e.describe() for e in edits], sort_keys=True),
        "where": ep.where,
        "mode": ep.mode,
        "run_id": run,
        "package_version": __version__,
        **precision_tag(ep.precision),
    }
    return EditJob(
        out=root.join("edits", run).uri, options=params.storage.options(), generator=gp, edits=tuple(edits),
        shape=table.shape, batch_size=ep.batch_size, num_actors=ep.num_actors, use_gpu=ep.use_gpu,
        output=ep.output, images_per_shard=ep.images_per_shard, row_group_size=ep.row_group_size,
        rows_per_file=ep.rows_per_file, metadata=metadata, fuser=fuser_uri, root=root.uri,
        table=table.prefix.uri, where=ep.where, unit_sha256=tuple((u.name, u.sha256) for u in units(table)),
        precision=ep.precision,
    )  # fmt: skip


def fuser_checkpoint(params, table: LatentTable) -> str:
    """Fuser mode: the fuser checkpoint the table was inverted with (``fuser_uri`` in its
    metadata, resolved under ``storage.root``); refused for a table inverted without one."""
    from mambastyle.checkpoints import checkpoint_source, file_sha256

    meta = table.metadata
    if not meta.get("fuser_sha256"):
        raise EditError(
            f"edit.mode is fuser, but {table.prefix.uri} was inverted without a fuser "
            "(set fuser.enabled: true and re-run the invert stage, or edit.mode: w_plus)"
        )
    options = params.storage.options()
    loc = resolve(meta["fuser_uri"], options)
    try:
        src = checkpoint_source(loc.uri, options)
    except FileNotFoundError:
        raise EditError(f"fuser mode: the table's fuser checkpoint {loc.uri} is missing") from None
    sha = file_sha256(src.getvalue() if hasattr(src, "getvalue") else src)
    if sha != meta["fuser_sha256"]:
        raise EditError(f"fuser mode: {loc.uri} is not the fuser the table was inverted with")
    return loc.uri
