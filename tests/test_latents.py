"""Latent tables: part files + manifest commit, validation, pyarrow/DuckDB/pandas queries."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
from helpers import META, make_table

from mambastyle.latents import (
    LatentTableError,
    build_part,
    open_table,
    schema,
)
from mambastyle.storage import StorageOptions, resolve


def test_round_trip_and_layout(tmp_path):
    prefix = resolve(str(tmp_path / "table"))
    truth = make_table(prefix)
    t = open_table(prefix.uri)
    assert (
        t.shape == (4, 8) and t.manifest["rows"] == 40 and t.manifest["splits"] == {"test": 10, "train": 30}
    )
    table = t.to_table()
    assert table.num_rows == 40 and sorted(table.column("key").to_pylist()) == sorted(truth)
    w = t.w_plus(table)
    for i, key in enumerate(table.column("key").to_pylist()):
        np.testing.assert_array_equal(w[i], truth[key][0])  # float32 exactly
        assert table.column("split")[i].as_py() == truth[key][2]
    assert t.metadata["generator_sha256"] == "g" * 64 and t.metadata["latent_space"] == "W+"
    # explicit row groups, zstd, no dictionary on w_plus
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(tmp_path / "table/split=train/part-000000.parquet").metadata
    assert meta.num_row_groups == 4  # 30 rows / 8
    col = meta.row_group(0).column(2)
    assert col.path_in_schema.startswith("w_plus") and col.compression == "ZSTD"
    assert "RLE_DICTIONARY" not in col.encodings and "PLAIN_DICTIONARY" not in col.encodings


def test_sql_pandas_and_pushdown_queries(tmp_path):
    prefix = resolve(str(tmp_path / "table"))
    truth = make_table(prefix)
    t = open_table(prefix.uri)
    want = sorted(k for k, (_, yaw, split) in truth.items() if yaw > 20 and split == "train")
    got = t.query("SELECT key, yaw FROM latents WHERE yaw > 20 AND split = 'train' ORDER BY key")
    assert got.column("key").to_pylist() == want
    df = t.to_pandas(filter=(pads.field("yaw") > 20) & (pads.field("split") == "train"), columns=["key"])
    assert sorted(df["key"]) == want
    sel = t.to_table(filter=pads.field("split") == "test", columns=["key", "w_plus"])
    assert sel.num_rows == 10
    np.testing.assert_array_equal(t.w_plus(sel)[0], truth[sel.column("key")[0].as_py()][0])
    with pytest.raises(LatentTableError, match="SQL error"):
        t.query("SELECT nope FROM latents")


def test_uncommitted_incomplete_or_foreign_tables_are_refused(tmp_path):
    prefix = resolve(str(tmp_path / "table"))
    with pytest.raises(LatentTableError, match="_manifest.json is missing"):
        open_table(prefix.uri)
    make_table(prefix)
    with pytest.raises(LatentTableError, match="generator_sha256 is 'g+', expected 'other'"):
        open_table(prefix.uri, expect={"generator_sha256": "other"})
    (tmp_path / "table/split=test/part-000000.parquet").unlink()
    with pytest.raises(
        LatentTableError, match="split=test/part-000000.parquet listed in the manifest is missing"
    ):
        open_table(prefix.uri)
    manifest = json.loads((tmp_path / "table/_manifest.json").read_text())
    manifest["format"] = "something-else"
    (tmp_path / "table/_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentTableError, match="not a version-1 latent table"):
        open_table(prefix.uri)


def test_shape_is_checked_when_building_parts():
    s = schema(4, 8, META)
    with pytest.raises(ValueError, match=r"w_plus must be \(n, 4, 8\)"):
        build_part({"key": ["a"], "shard": ["s"], "w_plus": np.zeros((1, 3, 8))}, s)


def test_tables_on_s3(s3):
    endpoint, bucket = s3
    options = StorageOptions(endpoint_url=endpoint)
    prefix = resolve(f"s3://{bucket}/latents/run-1", options)
    truth = make_table(prefix)
    t = open_table(prefix.uri, options)
    got = t.query("SELECT count(*) AS n FROM latents WHERE split = 'train'")
    assert got.column("n")[0].as_py() == 30 and len(truth) == 40


def test_cli_info_and_query(tmp_path, capsys, repo):
    from mambastyle.cli import main

    prefix = resolve(str(tmp_path / "table"))
    truth = make_table(prefix)
    params = str(repo / "params.yaml")
    assert main(["latents", "info", "--params", params, prefix.uri, "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 40 and info["shape"] == [4, 8] and info["metadata"]["run_id"] == "run-test"
    sql = "SELECT key, yaw FROM latents WHERE split = 'test' ORDER BY key"
    assert main(["latents", "query", "--params", params, prefix.uri, sql, "--limit", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "key\tyaw" and out[1].startswith("test_0000\t") and "7 more rows" in out[-1]
    csv = tmp_path / "sel.csv"
    assert main(["latents", "query", "--params", params, prefix.uri, sql, "--output", str(csv)]) == 0
    assert len(csv.read_text().splitlines()) == 11 and len(truth) == 40
    assert main(["latents", "query", "--params", params, prefix.uri, "SELECT w_plus FROM latents",
                 "--output", str(tmp_path / "w.csv")]) == 1  # fmt: skip
    assert "CSV cannot hold w_plus" in capsys.readouterr().err
    assert main(["latents", "info", "--params", params, str(tmp_path / "nothing")]) == 1
    assert "_manifest.json is missing" in capsys.readouterr().err


def test_cli_invert_names_a_missing_encoder(tmp_path, capsys, repo):
    from helpers import write_shards

    from mambastyle.cli import main

    write_shards(resolve(str(tmp_path)), {"train": [2]})
    args = ["latents", "invert", "--params", str(repo / "params.yaml"), "--root", str(tmp_path),
            "--encoder", str(tmp_path / "nope.pt")]  # fmt: skip
    assert main(args) == 1
    assert "nope.pt: no such checkpoint file" in capsys.readouterr().err
    assert (
        main(["latents", "invert", "--params", str(repo / "params.yaml"), "--root", str(tmp_path / "x")]) == 1
    )
    assert "run the prepare stage first" in capsys.readouterr().err


# text a user may put in `latents query`, edit.where or fit_where, meaning to reach past the table
OUTSIDE = {
    "a file": "SELECT * FROM read_csv('{secret}')",
    "a file by name": "SELECT * FROM '{secret}'",
    "a glob": "SELECT * FROM glob('{dir}/*')",
    "a copy out": "COPY (SELECT key FROM latents) TO '{dir}/out.csv'",
    "an attach": "ATTACH '{dir}/other.db'",
    "an extension": "INSTALL httpfs",
    "a load": "LOAD httpfs",
    "a setting": "SET enable_external_access = true",
    "a second statement": "SELECT 1; SELECT * FROM read_csv('{secret}')",
    "a table": "CREATE TABLE x AS SELECT 1",
    "a pragma": "PRAGMA database_list",
}


@pytest.mark.parametrize("what", sorted(OUTSIDE))
def test_queries_see_the_table_and_nothing_else(tmp_path, what):
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nhunter2\n")
    prefix = resolve(str(tmp_path / "table"))
    make_table(prefix, n_per_split=(3, 2))
    sql = OUTSIDE[what].format(secret=secret, dir=tmp_path)
    with pytest.raises(LatentTableError) as err:
        open_table(prefix.uri).query(sql)
    assert "hunter2" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv", "table"]  # nothing written


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("true) UNION SELECT key FROM latents WHERE (true", "not one SQL expression"),
        ("yaw > 0; DROP TABLE latents", "not one SQL expression"),
        ("yaw", "not true/false"),
        ("1", "not true/false"),
        ("key IN (SELECT * FROM read_csv('/etc/passwd'))", "condition"),
        ("nope > 1", "condition"),
    ],
)
def test_a_where_condition_is_one_boolean_expression(tmp_path, where, message):
    prefix = resolve(str(tmp_path / "table"))
    make_table(prefix, n_per_split=(3, 2))
    with pytest.raises(LatentTableError, match=message):
        open_table(prefix.uri).select(where, ["key"], ["key"])


def test_ordinary_selections_work_and_push_down(tmp_path):
    prefix = resolve(str(tmp_path / "table"))
    truth = make_table(prefix)
    t = open_table(prefix.uri)
    where = "split = 'train' AND yaw > 20 -- a trailing comment is fine"
    got = t.select(where, ["key", "yaw"], ["key"]).column("key").to_pylist()
    assert got == sorted(k for k, (_, yaw, split) in truth.items() if yaw > 20 and split == "train")
    # the sandbox leaves DuckDB's plan as it is: the scan reads only the columns used (w_plus,
    # the bulk of a row, is not read) and the condition is planned the same as without it
    import duckdb

    sql = "EXPLAIN SELECT key FROM latents WHERE (yaw > 20\n)"
    plain = duckdb.connect()
    plain.register("latents", t.dataset)
    con = t.duckdb()
    try:
        plan, reference = (c.sql(sql).fetchall()[0][1] for c in (con, plain))
    finally:
        con.close()
        plain.close()
    assert plan == reference and "Projections: key, yaw" in plan and "w_plus" not in plan, plan
