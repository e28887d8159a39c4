"""Resumable and incremental edits (``mambastyle.edit.units``): a driver killed mid-run and run
again edits only the rest and commits the table an uninterrupted run commits; an edits table
over a grown latent table takes the units it already edited from the earlier one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import kill_when, params
from test_edit_pipeline import _generator, _ifg

from mambastyle.checkpoints import state_sha256
from mambastyle.config import to_dict
from mambastyle.edit.stage import edit_from_params
from mambastyle.latents import (
    EDITS_FORMAT,
    build_part,
    commit,
    open_table,
    schema,
    table_metadata,
    write_part,
)
from mambastyle.runstats import TABLE_STATS_NAME
from mambastyle.storage import resolve

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _latents(root: Path, run: str, shards: dict[str, int], rng, codes: dict | None = None) -> str:
    """A latent table laid out as the invert stage writes it: one part per source shard, each
    naming its shard and sha256 (``shards``: name -> rows). Codes per key are kept in ``codes``
    so a second table can repeat them."""
    g = _generator()
    codes = {} if codes is None else codes
    meta = {"encoder_sha256": "e" * 64, "generator_sha256": state_sha256(g), "run_id": run,
            "compute_sha256": "c" * 64}  # fmt: skip
    part_schema = schema(g.n_styles, g.style_dim, meta)
    prefix = resolve(str(root / "latents" / run))
    parts = []
    for shard, n in shards.items():
        keys = [f"{shard}_{i:03d}" for i in range(n)]
        for k in keys:
            if k not in codes:
                with torch.no_grad():
                    z = torch.from_numpy(rng.normal(size=(1, g.style_dim)).astype(np.float32))
                    codes[k] = np.repeat(g.mapping(z, 0.7).numpy(), g.n_styles, 0)
        rows = {"key": keys, "shard": [f"{shard}.tar"] * n, "w_plus": np.stack([codes[k] for k in keys]),
                "yaw": [float(i) for i in range(n)]}  # fmt: skip
        path = f"split=test/{shard}-x.parquet"
        write_part(build_part(rows, part_schema), prefix.join(path), 16)
        parts.append({"path": path, "split": "test", "rows": n, "shard": f"test/{shard}.tar",
                      "shard_sha256": hashlib.sha256(shard.encode()).hexdigest()})  # fmt: skip
    commit(prefix, parts, table_metadata(part_schema))
    return prefix.uri


def _direction(path: Path) -> dict:
    """An InterFaceGAN-style direction file (written once: its sha256 is part of the edit)."""
    return _ifg(path, np.ones(_generator().style_dim, np.float32) / 8) | {"strengths": [-1.0, 0.0, 1.0]}


def _params(root: Path, table: str, entry: dict, **edit):
    section = {"table": table, "where": "yaw >= 1", "edits": [entry], "batch_size": 4,
               "images_per_shard": 6, "grid_samples": 2, **edit}  # fmt: skip
    return params(storage={"root": str(root)}, ray={"num_cpus": 2}, edit=section)


def _rows(uri: str) -> list[tuple]:
    t = open_table(uri, fmt=EDITS_FORMAT).to_table(columns=["key", "edit", "strength", "w_plus", "score"])
    return sorted((r["key"], r["edit"], r["strength"], tuple(r["w_plus"]), r["score"]) for r in t.to_pylist())


def _parts(prefix: Path) -> list[Path]:
    return [f for f in prefix.rglob("*.parquet") if not f.name.startswith(".")]


def test_a_killed_edit_driver_resumes_with_only_the_rest_edited(tmp_path, rng):
    root = tmp_path / "data"
    shards = {f"s{i}": 13 for i in range(8)}
    table = _latents(root, "run-a", shards, rng)
    p = _params(root, table, _direction(tmp_path / "ifg.pt"))
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(to_dict(p)))
    cmd = [sys.executable, "-m", "mambastyle.cli", "edit", "apply", "--params", str(pf), "--json"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, lambda: any(_parts(r) for r in (root / "edits").glob("run-*")))
    (prefix,) = list((root / "edits").glob("run-*"))
    assert not (prefix / "_manifest.json").exists()
    done = {k for f in _parts(prefix) for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()}
    selected = 8 * 12  # yaw >= 1: all but the first row of each shard
    assert 0 < len(done) < selected
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    stats = json.loads(again.stdout)
    assert (stats["inputs"], stats["written"]) == (selected, 3 * selected)
    assert (stats["reused"], stats["computed"]) == (len(done), selected - len(done))
    manifest = json.loads((prefix / "_manifest.json").read_text())
    assert manifest["resumed"] == 3 * len(done) and manifest["images"]["count"] == 3 * selected
    # the files are exactly the committed table's: its parts, the tars they point into
    listed = {str(prefix / x["path"]) for x in manifest["parts"] + manifest["shards"]}
    present = {str(f) for f in prefix.rglob("*") if f.is_file()}
    assert present == listed | {str(prefix / "_manifest.json"), str(prefix / TABLE_STATS_NAME)}
    # each image a tar holds is the one its row names, and each tar is counted as it is
    t = open_table(str(prefix), fmt=EDITS_FORMAT).to_table(columns=["key", "image"])
    assert len(set(t.column("image").to_pylist())) == 3 * selected
    # the same rows as an uninterrupted run elsewhere
    other = tmp_path / "other"
    table2 = _latents(other, "run-a", shards, np.random.default_rng(0), codes=_codes(table))
    edit_ok = subprocess.run([*cmd[:-1], "--table", table2, "--root", str(other)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert edit_ok.returncode == 0, edit_ok.stderr[-3000:]
    (ref,) = list((other / "edits").glob("run-*"))
    assert _rows(str(prefix)) == _rows(str(ref))


def _codes(uri: str) -> dict:
    t = open_table(uri)
    rows = t.to_table(columns=["key", "w_plus"])
    return dict(zip(rows.column("key").to_pylist(), t.w_plus(rows), strict=True))


def test_edits_over_a_grown_table_reuse_the_units_already_edited(tmp_path, rng, ray_local):
    root = tmp_path / "data"
    codes: dict = {}
    first_table = _latents(root, "run-a", {"s0": 5, "s1": 4}, rng, codes)
    entry = _direction(tmp_path / "ifg.pt")
    p = _params(root, first_table, entry)
    first = edit_from_params(p, ray_connect=False)
    assert first.manifest["computed"] == 3 * (4 + 3) and first.manifest["reused"]["rows"] == 0
    # the latent table grows by a shard; the old shards' rows are unchanged
    grown_table = _latents(root, "run-b", {"s0": 5, "s1": 4, "s2": 6}, rng, codes)
    second = edit_from_params(_params(root, grown_table, entry), ray_connect=False)
    assert second.prefix.uri != first.prefix.uri
    m = second.manifest
    assert m["selected"] == 4 + 3 + 5 and m["rows"] == 3 * 12
    assert m["computed"] == 3 * 5 and m["reused"] == {"rows": 3 * 7, "from": {first.prefix.uri: 3 * 7}}
    stats = json.loads(Path(second.prefix.join(TABLE_STATS_NAME).path).read_text())
    assert (stats["inputs"], stats["computed"], stats["reused"]) == (12, 5, 7)
    # reused rows and images are the first table's; the copies live in the new table
    before = {r[:3]: r for r in _rows(first.prefix.uri)}
    after = _rows(second.prefix.uri)
    assert all(r == before[r[:3]] for r in after if r[0].startswith(("s0", "s1")))
    t = open_table(second.prefix.uri, fmt=EDITS_FORMAT).to_table(columns=["key", "image"])
    assert all(u.startswith(second.prefix.uri + "/images/") for u in t.column("image").to_pylist())
    from mambastyle.edit.pipeline import read_images

    old = open_table(first.prefix.uri, fmt=EDITS_FORMAT).to_table(
        columns=["key", "edit", "strength", "image"]
    )
    new = open_table(second.prefix.uri, fmt=EDITS_FORMAT).to_table(
        columns=["key", "edit", "strength", "image"]
    )
    old_uri = {(r["key"], r["strength"]): r["image"] for r in old.to_pylist()}
    pairs = [
        (old_uri[r["key"], r["strength"]], r["image"]) for r in new.to_pylist() if r["key"].startswith("s1")
    ]
    a, b = read_images([x for x, _ in pairs]), read_images([y for _, y in pairs])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # another selection is another computation: nothing reused
    third = edit_from_params(_params(root, grown_table, entry, where="yaw >= 2"), ray_connect=False)
    assert third.manifest["reused"]["rows"] == 0 and third.manifest["computed"] == 3 * (3 + 2 + 4)
    # a committed table run again: nothing edited, the same rows
    again = edit_from_params(_params(root, grown_table, entry), ray_connect=False)
    assert again.manifest["computed"] == 0 and again.manifest["resumed"] == 3 * 12
    assert _rows(again.prefix.uri) == after
