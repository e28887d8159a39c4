"""Resumable and incremental inversion (``mambastyle.invert.resume``): a driver killed mid-run
and re-run computes only the rest and commits the table an uninterrupted run commits; a grown
or changed dataset recomputes only new or changed shards and says where the rest came from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import kill_when, params, write_shards
from test_invert_pipeline import _encoder_bytes

from mambastyle.config import to_dict
from mambastyle.invert.pipeline import invert_from_params
from mambastyle.latents import open_table
from mambastyle.runstats import TABLE_STATS_NAME
from mambastyle.storage import list_files, resolve, write_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _root(path: Path, counts: dict, seed: int = 0) -> dict:
    root = resolve(str(path))
    images = write_shards(root, counts, seed=seed)
    write_bytes(root.join("encoder.pt"), _encoder_bytes(), durable=False)
    return images


def _params(path: Path, **invert):
    invert = {"encoder": str(path / "encoder.pt"), "batch_size": 4, "rows_per_file": 8, **invert}
    return params(storage={"root": str(path)}, ray={"num_cpus": 2}, invert=invert)


def _cli(p, tmp_path: Path, *args: str) -> subprocess.Popen:
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(to_dict(p)))
    cmd = [sys.executable, "-m", "mambastyle.cli", "latents", "invert", "--params", str(pf), *args]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(uri: str) -> list[dict]:
    return sorted(open_table(uri).to_table().to_pylist(), key=lambda r: r["key"])


def _staged(prefix: Path) -> dict[str, list[str]]:
    return {
        str(f): pq.read_table(f, columns=["key"]).column("key").to_pylist()
        for f in prefix.rglob("*.parquet")
        if not f.name.startswith(".")
    }


def test_a_killed_driver_resumes_with_only_the_rest_computed(tmp_path):
    counts = {"train": [24] * 8, "val": [24], "test": [24]}
    total = 24 * 10
    root = tmp_path / "data"
    _root(root, counts)
    p = _params(root)
    proc = _cli(p, tmp_path)
    kill_when(proc, lambda: any(_staged(t) for t in (root / "latents").glob("run-*")))
    (prefix,) = list((root / "latents").glob("run-*"))
    assert not (prefix / "_manifest.json").exists()  # killed before the commit
    staged = _staged(prefix)
    done = sum(len(k) for k in staged.values())
    assert 0 < done < total, done
    # the re-run computes the rest only, and says so
    again = _cli(p, tmp_path, "--json")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    stats = json.loads(out)
    assert stats["inputs"] == total and stats["written"] == total
    assert (stats["reused"], stats["computed"]) == (done, total - done)
    manifest = json.loads((prefix / "_manifest.json").read_text())
    assert manifest["resumed"] == stats["reused"] and manifest["computed"] == stats["computed"]
    # only the committed table's files remain: the staged parts are its parts
    listed = {str(prefix / x["path"]) for x in manifest["parts"]}
    assert {str(f) for f in prefix.rglob("*") if f.is_file()} == listed | {
        str(prefix / "_manifest.json"),
        str(prefix / TABLE_STATS_NAME),
    }
    assert set(staged) <= listed
    # the same table as an uninterrupted run on a copy of the inputs (codes are bit-exact: the
    # model batches are padded to a fixed size, so a row does not depend on its batch companions)
    other = tmp_path / "other"
    shutil.copytree(root / "shards", other / "shards")
    shutil.copy(root / "encoder.pt", other / "encoder.pt")
    fresh = _cli(_params(other), tmp_path)
    _, err = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, err[-3000:]
    (ref,) = list((other / "latents").glob("run-*"))
    assert ref.name == prefix.name
    assert _rows(str(prefix)) == _rows(str(ref))


def test_a_grown_or_changed_dataset_computes_only_new_and_changed_shards(tmp_path, ray_local):
    root = tmp_path / "data"
    images = _root(root, {"train": [6, 5], "val": [3], "test": [4]})
    p = _params(root)
    first, first_prefix = invert_from_params(p, ray_connect=False)
    assert first["computed"] == 18 and first["reused"]["rows"] == 0
    # a new shard appended and one shard's content replaced, the others byte-identical
    manifest_path = root / "shards" / "manifest.json"
    old = json.loads(manifest_path.read_text())
    extra = tmp_path / "extra"
    write_shards(resolve(str(extra)), {"train": [6, 5, 4], "val": [3]}, seed=1)
    new = json.loads((extra / "shards" / "manifest.json").read_text())
    for path in ("train/train-000002.tar", "val/val-000000.tar"):
        shutil.copy(extra / "shards" / path, root / "shards" / path)
    entries = {e["path"]: e for e in old["shards"]}
    entries.update({e["path"]: e for e in new["shards"] if e["path"] in ("train/train-000002.tar",
                                                                       "val/val-000000.tar")})  # fmt: skip
    manifest_path.write_text(
        json.dumps({"version": 1, "shards": sorted(entries.values(), key=lambda e: e["path"])})
    )
    second, prefix = invert_from_params(p, ray_connect=False)
    assert prefix.uri != first_prefix.uri
    assert second["rows"] == 6 + 5 + 4 + 3 + 4
    assert second["computed"] == 4 + 3  # the new train shard and the changed val shard
    assert second["reused"] == {"rows": 6 + 5 + 4, "from": {first_prefix.uri: 6 + 5 + 4}}
    stats = json.loads(Path(prefix.join(TABLE_STATS_NAME).path).read_text())
    assert (stats["computed"], stats["reused"], stats["inputs"]) == (7, 15, 22)
    # reused rows are the first table's rows exactly; the table opens and validates as one
    before = {r["key"]: r for r in _rows(first_prefix.uri)}
    after = {r["key"]: r for r in _rows(prefix.uri)}
    for key, row in after.items():
        if key.startswith(("train_00", "train_01", "test_")):
            assert row == before[key]
    assert sorted(after) == sorted(
        [k for k in images if not k.startswith("val")] + [f"train_02_{i:03d}" for i in range(4)]
        + [f"val_00_{i:03d}" for i in range(3)]
    )  # fmt: skip
    assert open_table(prefix.uri).metadata["run_id"] == prefix.path.rsplit("/", 1)[-1]
    # other settings (no metrics): nothing is reused
    q = _params(root, metrics=False)
    third, _ = invert_from_params(q, ray_connect=False)
    assert third["computed"] == 22 and third["reused"]["rows"] == 0
    # a committed table re-run: nothing computed, same rows
    again, _ = invert_from_params(p, ray_connect=False)
    assert again["computed"] == 0 and again["resumed"] == 22
    assert _rows(prefix.uri) == sorted(after.values(), key=lambda r: r["key"])
    assert len(list_files(prefix)) == len(again["parts"]) + 2
