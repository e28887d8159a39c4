"""Latent tables: Parquet datasets of W+ codes, written part by part and committed by a manifest.

A table lives under one prefix (local or S3)::

    {prefix}/split={split}/part-{name}.parquet   Hive-partitioned by split
    {prefix}/_manifest.json                      written last: the commit point

Columns: ``key`` (string), ``shard`` (string), ``w_plus`` (fixed-size list of float32,
n_styles * style_dim, row-major (n_styles, style_dim)), reconstruction metrics (``mse``,
``ssim``, ``lpips``; null when not measured) and source metadata (``yaw``, ``pitch``, ``roll``,
``score``, ``source``). ``split`` comes from the partition directory. Schema metadata
records the latent space, the code shape, the encoder and generator sha256, the package
version and the run id. Readers trust only the files the manifest lists and validate the
schema and metadata before use, naming what is wrong.

Its length is the one home of the format in both directions: writing and committing parts,
opening and validating tables, and the sandboxed SQL every query surface goes through.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mambastyle import __version__
from mambastyle.storage import (
    Location,
    StorageOptions,
    delete,
    exists,
    list_files,
    read_bytes,
    resolve,
    write_bytes,
)

TABLE_FORMAT = "mambastyle-latents"
EDITS_FORMAT = "mambastyle-edits"  # the edit stage's table: same layout, keyed by (key, edit, strength)
TABLE_VERSION = 1
MANIFEST = "_manifest.json"
META_PREFIX = "mambastyle."
REQUIRED_META = ("format", "version", "latent_space", "shape", "generator_sha256", "package_version",
                 "run_id")  # fmt: skip
# per format: the name SQL sees, the columns (beyond w_plus and split) and metadata it must have
FORMATS = {
    TABLE_FORMAT: ("latents", {"key": pa.string(), "shard": pa.string()}, ("encoder_sha256",)),
    EDITS_FORMAT: ("edits", {"key": pa.string(), "edit": pa.string(), "strength": pa.float64(),
                             "image": pa.string()}, ("source_table", "edits")),
}  # fmt: skip
# reconstruction metrics of the W+ code, and with the fuser's feature correction (null without one)
METRIC_COLUMNS = ("mse", "ssim", "lpips", "mse_fuser", "ssim_fuser", "lpips_fuser")
SOURCE_COLUMNS = ("yaw", "pitch", "roll", "score")


class LatentTableError(ValueError):
    """A latent table is missing, incomplete or does not match the expected schema/metadata."""


def schema(n_styles: int, style_dim: int, metadata: Mapping[str, str]) -> pa.Schema:
    """The Arrow schema of a part file (``split`` is the Hive partition, not a column)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("w_plus", pa.list_(pa.float32(), n_styles * style_dim), nullable=False),
        *[pa.field(name, pa.float32()) for name in METRIC_COLUMNS],
        *[pa.field(name, pa.float32()) for name in SOURCE_COLUMNS],
        pa.field("source", pa.string()),
    ]
    return pa.schema(fields, metadata=schema_metadata(TABLE_FORMAT, n_styles, style_dim, metadata))


def schema_metadata(fmt: str, n_styles: int, style_dim: int, metadata: Mapping[str, str]) -> dict[str, str]:
    """``mambastyle.*`` schema metadata of a ``fmt`` table of (n_styles, style_dim) codes."""
    meta = {f"{META_PREFIX}{k}": str(v) for k, v in metadata.items()}
    meta[f"{META_PREFIX}format"] = fmt
    meta[f"{META_PREFIX}version"] = str(TABLE_VERSION)
    meta[f"{META_PREFIX}latent_space"] = "W+"
    meta[f"{META_PREFIX}shape"] = json.dumps([n_styles, style_dim])
    meta.setdefault(f"{META_PREFIX}package_version", __version__)
    return meta


def table_metadata(s: pa.Schema) -> dict[str, str]:
    """The ``mambastyle.*`` schema metadata, without the prefix."""
    raw = s.metadata or {}
    return {
        k.decode()[len(META_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(META_PREFIX)
    }


def build_part(rows: Mapping[str, object], part_schema: pa.Schema) -> pa.Table:
    """A part table from column arrays; ``w_plus`` is (n, n_styles, style_dim) float32."""
    w = np.ascontiguousarray(rows["w_plus"], dtype=np.float32)
    n_styles, style_dim = json.loads(table_metadata(part_schema)["shape"])
    if w.ndim != 3 or w.shape[1:] != (n_styles, style_dim):
        raise ValueError(f"w_plus must be (n, {n_styles}, {style_dim}), got {w.shape}")
    n = w.shape[0]
    flat = pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1)), n_styles * style_dim)
    arrays = []
    for field in part_schema:
        if field.name == "w_plus":
            arrays.append(flat)
            continue
        values = rows.get(field.name)
        if values is None:
            values = [None] * n
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=part_schema)


CLUSTER_BY = ("yaw", "key")  # row order within a part: pose range queries skip row groups
EDITS_CLUSTER_BY = ("edit", "strength", "key")  # in an edits part: an edit/strength predicate skips the rest
DICTIONARY_COLUMNS = ("shard", "source", "edit")  # few distinct values per part


def write_part(
    table: pa.Table, loc: Location, row_group_size: int, sort_by: tuple[str, ...] = CLUSTER_BY
) -> None:
    """Writes one part file whole (temporary name + rename locally; a completed upload on S3).

    Rows are ordered by ``sort_by`` (for latents: yaw, then key), so each row group covers a
    narrow yaw range and its statistics let a pose predicate (``yaw > 20``) skip the others,
    ``w_plus`` included; predicates on other columns read every row group. Float columns and
    codes use byte-stream-split encoding, low-cardinality strings a dictionary, codes never.
    """
    order = pa.compute.sort_indices(table, sort_keys=[(c, "ascending", "at_end") for c in sort_by])
    table = table.take(order)
    names = table.schema.names
    floats = [f.name for f in table.schema
              if pa.types.is_floating(f.type) or (pa.types.is_fixed_size_list(f.type)
                                                  and pa.types.is_floating(f.type.value_type))]  # fmt: skip
    options = {
        "row_group_size": row_group_size,
        "compression": "zstd",
        "use_dictionary": [f.name for f in table.schema if f.name in DICTIONARY_COLUMNS],
        "use_byte_stream_split": floats,
        "write_statistics": [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)],
        "sorting_columns": [pq.SortingColumn(names.index(c), nulls_first=False) for c in sort_by],
    }
    if loc.is_s3:
        pq.write_table(table, loc.path, filesystem=loc.fs, **options)
        return
    parent = posixpath.dirname(loc.path)
    loc.fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(loc.path)}.tmp-{uuid.uuid4().hex}")
    try:
        pq.write_table(table, tmp, filesystem=loc.fs, **options)
        loc.fs.move(tmp, loc.path)
    finally:
        if exists(Location(loc.fs, tmp, tmp)):
            loc.fs.delete_file(tmp)


def remove_unlisted(prefix: Location, listed: list[str]) -> None:
    """After a commit: removes the files under ``prefix`` other than the ``listed`` ones (paths
    below it: the manifest's parts and image files), the manifest and the run statistics; what
    a killed or earlier run left there that the table does not use."""
    from mambastyle.runstats import TABLE_STATS_NAME

    keep = {prefix.join(p).path for p in [*listed, MANIFEST, TABLE_STATS_NAME]}
    for path in list_files(prefix):
        if path not in keep:
            delete(Location(prefix.fs, path, path))


def part_metadata(prefix: Location, parts: list[dict]) -> dict[str, str]:
    """The ``mambastyle.*`` metadata as the first written part carries it (what readers compare
    the manifest against)."""
    if not parts:
        raise LatentTableError(f"{prefix.uri}: no rows were written")
    first = prefix.join(parts[0]["path"])
    with first.fs.open_input_file(first.path) as f:
        return table_metadata(pq.read_schema(f))


def commit(
    prefix: Location,
    parts: list[dict],
    metadata: Mapping[str, str],
    extra: Mapping | None = None,
    fmt: str = TABLE_FORMAT,
) -> dict:
    """Writes ``_manifest.json`` (the commit point) listing ``parts`` ({path, split, rows})."""
    manifest = {
        "format": fmt,
        "version": TABLE_VERSION,
        "metadata": dict(metadata),
        "rows": sum(p["rows"] for p in parts),
        "splits": {
            s: sum(p["rows"] for p in parts if p["split"] == s) for s in sorted({p["split"] for p in parts})
        },
        "parts": sorted(parts, key=lambda p: p["path"]),
        **dict(extra or {}),
    }
    write_bytes(prefix.join(MANIFEST), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


@dataclass
class LatentTable:
    """An opened, validated latent table."""

    prefix: Location
    manifest: dict
    dataset: pads.Dataset

    @property
    def metadata(self) -> dict[str, str]:
        return table_metadata(self.dataset.schema)

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def name(self) -> str:
        """The name SQL sees: ``latents`` or ``edits``."""
        return FORMATS[self.format][0]

    @property
    def shape(self) -> tuple[int, int]:
        n_styles, style_dim = json.loads(self.metadata["shape"])
        return int(n_styles), int(style_dim)

    def to_table(self, filter=None, columns: list[str] | None = None) -> pa.Table:
        return self.dataset.to_table(filter=filter, columns=columns)

    def to_pandas(self, filter=None, columns: list[str] | None = None):
        return self.to_table(filter, columns).to_pandas()

    def w_plus(self, table: pa.Table) -> np.ndarray:
        """The ``w_plus`` column of ``table`` as (n, n_styles, style_dim) float32 (no copy)."""
        col = table.column("w_plus").combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(-1, *self.shape)

    def duckdb(self, connection=None, name: str | None = None):
        """A DuckDB connection with the table registered as ``name`` (default :attr:`name`;
        filters push down to Arrow): :func:`sql_connection`'s, which sees the table and nothing
        else, unless you pass your own ``connection``."""
        if connection is None:
            return sql_connection({name or self.name: self.dataset})
        connection.register(name or self.name, self.dataset)
        return connection

    def query(self, sql: str, name: str | None = None) -> pa.Table:
        """Runs one SELECT over the table (registered as ``latents``, or ``edits`` for an edits
        table) in a connection that sees nothing else; returns an Arrow table."""
        import duckdb

        con = self.duckdb(name=name)
        try:
            check_query(con, sql)
            return con.sql(sql).to_arrow_table()
        except duckdb.CatalogException as exc:
            # DuckDB suggests its own catalog's names ("Did you mean pg_settings?"): name ours
            registered = name or self.name
            first = str(exc).splitlines()[0].split("!")[0]
            raise LatentTableError(
                f"SQL error: {first}; this table is queried as `{registered}` "
                f"(columns: {', '.join(self.dataset.schema.names)})"
            ) from None
        except duckdb.Error as exc:
            raise LatentTableError(f"SQL error: {exc}") from None
        finally:
            con.close()

    def select(self, where: str, columns: list[str], order: list[str], limit: int | None = None) -> pa.Table:
        """``columns`` of the rows that ``where`` (one boolean SQL expression over the table's
        columns) selects, sorted by ``order`` (the first ``limit``); the condition pushes down
        to the Parquet scan."""
        import duckdb

        con = self.duckdb()
        try:
            cond = where_clause(con, self.name, where)
            sql = f"SELECT {', '.join(columns)} FROM {self.name} WHERE {cond} ORDER BY {', '.join(order)}"
            if limit is not None:
                sql += f" LIMIT {int(limit)}"
            return con.sql(sql).to_arrow_table()
        except duckdb.Error as exc:
            raise LatentTableError(f"SQL error: {exc}") from None
        finally:
            con.close()

    def count(self, where: str) -> int:
        """How many rows ``where`` selects (reads only the columns the condition names)."""
        import duckdb

        con = self.duckdb()
        try:
            cond = where_clause(con, self.name, where)
            return int(con.sql(f"SELECT count(*) FROM {self.name} WHERE {cond}").fetchall()[0][0])
        except duckdb.Error as exc:
            raise LatentTableError(f"SQL error: {exc}") from None
        finally:
            con.close()


def sibling_tables(prefix: Location) -> list[tuple[Location, dict]]:
    """The other committed tables in the folder that holds ``prefix`` (e.g. ``{root}/latents``),
    as (prefix, manifest), newest first; folders without a readable manifest are passed over."""
    import pyarrow.fs as pafs

    parent = Location(prefix.fs, posixpath.dirname(prefix.path), prefix.uri.rsplit("/", 1)[0])
    found = []
    selector = pafs.FileSelector(parent.path, recursive=False, allow_not_found=True)
    for info in prefix.fs.get_file_info(selector):
        if info.type != pafs.FileType.Directory or info.path == prefix.path:
            continue
        other = parent.join(posixpath.basename(info.path))
        try:
            manifest = json.loads(read_bytes(other.join(MANIFEST)))
        except (OSError, ValueError):
            continue  # not a committed table
        found.append((info.mtime_ns or 0, other, manifest))
    return [(other, manifest) for _, other, manifest in sorted(found, key=lambda t: t[0], reverse=True)]


def sql_connection(tables: Mapping[str, object]):
    """A DuckDB connection that sees ``tables`` (Arrow datasets or tables, by name) and nothing
    else: no file or network access, no extensions, and settings locked so SQL cannot undo that.

    Every SQL surface (``latents query``, ``edit.where``, ``fit_where``, the Python helpers)
    goes through one, since the text comes from users and may run on a cluster's head node
    with its storage rights.
    """
    import duckdb

    con = duckdb.connect(config={
        "enable_external_access": "false",
        "autoload_known_extensions": "false",
        "autoinstall_known_extensions": "false",
    })  # fmt: skip
    for name, data in tables.items():
        con.register(name, data)
    con.execute("SET lock_configuration = true")
    return con


def check_query(con, sql: str) -> None:
    """Refuses anything but one SELECT statement (no COPY, ATTACH, INSTALL, LOAD, SET, PRAGMA,
    CREATE, no second statement), before any of it runs."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise LatentTableError(f"SQL error: {exc}") from None
    kinds = [s.type.name for s in statements]
    if kinds != ["SELECT"]:
        raise LatentTableError(f"one SELECT statement is allowed, got {' + '.join(kinds) or 'none'}: {sql!r}")


def where_clause(con, source: str, where: str) -> str:
    """``where`` checked to be one boolean SQL expression over the rows of ``source`` (a table
    name, or a join), parenthesised for a ``WHERE``. A condition that ends early and goes on
    (``true) UNION SELECT ...``) or is not a boolean is refused before anything runs."""
    import duckdb

    try:
        duckdb.SQLExpression(where)
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        raise LatentTableError(f"the condition {where!r} is not one SQL expression ({first})") from None
    cond = f"({where}\n)"  # the newline ends a trailing -- comment inside the parentheses
    try:
        kind = con.sql(f"SELECT {cond} AS cond FROM {source} LIMIT 0").types[0]
    except duckdb.Error as exc:
        raise LatentTableError(f"the condition {where!r}: {str(exc).splitlines()[0]}") from None
    if str(kind) != "BOOLEAN":
        raise LatentTableError(f"the condition {where!r} is {kind}, not true/false")
    return cond


def open_table(
    uri: str,
    options: StorageOptions | None = None,
    expect: Mapping[str, str] | None = None,
    fmt: str | None = TABLE_FORMAT,
) -> LatentTable:
    """Opens the committed table at ``uri`` as a pyarrow dataset over the files its manifest lists.

    ``expect`` maps metadata keys (e.g. ``generator_sha256``) to required values; ``fmt`` is
    the table kind (a latent table, or the edit stage's ``EDITS_FORMAT``; None: either).

    Raises:
        LatentTableError: no manifest (not a table, or a run that did not finish), a listed
            part missing, or schema/metadata that do not match (the message names what).
    """
    prefix = resolve(uri, options)
    loc = prefix.join(MANIFEST)
    try:
        manifest = json.loads(read_bytes(loc))
    except FileNotFoundError:
        raise LatentTableError(
            f"no latent table at {prefix.uri}: {MANIFEST} is missing (not committed)"
        ) from None
    except (OSError, ValueError) as exc:
        raise LatentTableError(f"{loc.uri}: unreadable manifest ({exc})") from None
    if fmt is None and manifest.get("format") in FORMATS:
        fmt = manifest["format"]
    if manifest.get("format") != fmt or manifest.get("version") != TABLE_VERSION:
        what = "latent" if fmt in (TABLE_FORMAT, None) else FORMATS[fmt][0]
        found = manifest.get("format")
        raise LatentTableError(
            f"{loc.uri}: not a version-{TABLE_VERSION} {what} table manifest (format {found!r})"
        )
    paths = [prefix.join(p["path"]).path for p in manifest["parts"]]
    for path, part in zip(paths, manifest["parts"], strict=True):
        if not exists(Location(prefix.fs, path, path)):
            raise LatentTableError(f"{prefix.uri}: part {part['path']} listed in the manifest is missing")
    partitioning = pads.partitioning(pa.schema([("split", pa.string())]), flavor="hive")
    try:
        dataset = pads.dataset(paths, format="parquet", filesystem=prefix.fs, partitioning=partitioning,
                               partition_base_dir=prefix.path)  # fmt: skip
    except (pa.ArrowInvalid, OSError) as exc:
        raise LatentTableError(f"{prefix.uri}: unreadable part files ({exc})") from None
    table = LatentTable(prefix, manifest, dataset)
    _validate(table, expect or {})
    return table


def _validate(table: LatentTable, expect: Mapping[str, str]) -> None:
    where = table.prefix.uri
    meta = table.metadata
    fmt = table.manifest["format"]
    _, columns, required = FORMATS[fmt]
    missing = [k for k in (*REQUIRED_META, *required) if k not in meta]
    if missing:
        raise LatentTableError(
            f"{where}: schema metadata lacks {', '.join(META_PREFIX + k for k in missing)}"
        )
    if meta["format"] != fmt or meta["latent_space"] != "W+":
        raise LatentTableError(f"{where}: not a W+ {table.name} table (format {meta['format']!r})")
    n_styles, style_dim = table.shape
    want = {**columns, "w_plus": pa.list_(pa.float32(), n_styles * style_dim), "split": pa.string()}
    s = table.dataset.schema
    for name, typ in want.items():
        if name not in s.names:
            raise LatentTableError(f"{where}: column {name!r} is missing")
        if s.field(name).type != typ:
            raise LatentTableError(f"{where}: column {name!r} is {s.field(name).type}, expected {typ}")
    for key, value in expect.items():
        if meta.get(key) != str(value):
            raise LatentTableError(f"{where}: metadata {key} is {meta.get(key)!r}, expected {value!r}")
    for name in table.manifest["metadata"]:
        if table.manifest["metadata"][name] != meta.get(name):
            raise LatentTableError(f"{where}: part metadata {name!r} does not match the manifest")
