"""The edit stage on Ray Data: selected latent-table rows -> edited images + a committed edits table."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from helpers import params

from mambastyle.checkpoints import state_sha256
from mambastyle.config import ConfigError
from mambastyle.edit.core import render
from mambastyle.edit.pipeline import EditError, read_images
from mambastyle.edit.stage import edit_from_params
from mambastyle.generate import resolve_generator
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
from mambastyle.storage import StorageOptions, list_files, resolve

SPLITS = {"train": 300, "test": 6}


def _generator():
    p = params()
    gp = p.generator
    return resolve_generator(None, gp.architecture, gp.init_seed, gp.latent_avg_samples)


def _table(
    root_uri: str,
    rng: np.random.Generator,
    options: StorageOptions | None = None,
    generator_sha: str | None = None,
):
    """A latent table of codes from the tiny generator's mapping, with ``yaw`` a planted linear
    function of the layer-mean code (plus noise). Returns (uri, codes by key, planted direction)."""
    g = _generator()
    n = sum(SPLITS.values())
    with torch.no_grad():
        w = g.mapping(torch.from_numpy(rng.normal(size=(n, g.style_dim)).astype(np.float32)), 0.7).numpy()
    codes = w[:, None, :] + 0.05 * rng.normal(size=(n, g.n_styles, g.style_dim)).astype(np.float32)
    a = rng.normal(size=g.style_dim)
    a /= np.linalg.norm(a)
    proj = codes.mean(1) @ a
    yaw = 15.0 * (proj - proj.mean()) / proj.std() + rng.normal(scale=0.5, size=n)
    keys = [f"img{i:03d}" for i in range(n)]
    splits = [s for s, k in SPLITS.items() for _ in range(k)]
    meta = {
        "encoder_sha256": "e" * 64,
        "generator_sha256": generator_sha or state_sha256(g),
        "run_id": "run-test",
    }
    part_schema = schema(g.n_styles, g.style_dim, meta)
    prefix = resolve(f"{root_uri}/latents/run-test", options)
    parts = []
    for split in SPLITS:
        idx = [i for i, s in enumerate(splits) if s == split]
        rows = {"key": [keys[i] for i in idx], "shard": ["s.tar"] * len(idx), "w_plus": codes[idx],
                "yaw": yaw[idx].tolist()}  # fmt: skip
        path = f"split={split}/part-0.parquet"
        write_part(build_part(rows, part_schema), prefix.join(path), 16)
        parts.append({"path": path, "split": split, "rows": len(idx)})
    commit(prefix, parts, table_metadata(part_schema))
    return prefix.uri, dict(zip(keys, codes, strict=True)), a


def _edit_params(root_uri: str, table: str, endpoint: str | None = None, **edit):
    entries = edit.pop("edits", None) or [
        {"name": "yaw", "source": "fit", "uri": None, "component": None, "absolute": False, "column": "yaw",
         "labels": None, "fit_where": "split = 'train'", "space": "W", "strengths": [-2.0, 0.0, 2.0],
         "layers": None},
    ]  # fmt: skip
    section = {"table": table, "where": "split = 'test'", "edits": entries, "batch_size": 4,
               "rows_per_file": 5, "images_per_shard": 7, "grid_samples": 3, **edit}  # fmt: skip
    return params(storage={"root": root_uri, "endpoint_url": endpoint}, edit=section)


def _ifg(path, arr) -> dict:
    torch.save(torch.from_numpy(np.asarray(arr, np.float32)), path)
    return {"name": "ifg", "source": "interfacegan", "uri": str(path), "component": None, "absolute": False,
            "column": None, "labels": None, "fit_where": None, "space": "W", "strengths": [1.5],
            "layers": [0, 4]}  # fmt: skip


def test_edits_are_complete_exact_at_zero_monotonic_and_rerun_idempotently(rng, tmp_path, ray_local):
    root = str(tmp_path / "data")
    uri, codes, planted = _table(root, rng)
    g = _generator()
    direction = rng.normal(size=(1, g.style_dim))
    p = _edit_params(
        root, uri, edits=[_edit_params(root, uri).edit.edits[0].__dict__, _ifg(tmp_path / "d.pt", direction)]
    )
    result = edit_from_params(p, ray_connect=False)
    m = result.manifest
    test_keys = sorted(k for k in codes if int(k[3:]) >= SPLITS["train"])
    assert m["selected"] == 6 and m["rows"] == 6 * 4 and m["splits"] == {"test": 24}
    assert m["images"]["count"] == 24 and m["images"]["files"] == len(m["shards"]) >= 4  # 7 images per tar
    t = open_table(result.prefix.uri, fmt=EDITS_FORMAT)
    rows = t.to_table().to_pylist()
    triples = [(r["key"], r["edit"], r["strength"]) for r in rows]
    want = {(k, "yaw", s) for k in test_keys for s in (-2.0, 0.0, 2.0)} | {(k, "ifg", 1.5) for k in test_keys}
    assert len(triples) == len(set(triples)) == 24 and set(triples) == want
    by = {(r["key"], r["edit"], r["strength"]): r for r in rows}
    # strength 0: the code is the table's, bit for bit, and the image is its reconstruction
    images = read_images([by[k, "yaw", 0.0]["image"] for k in test_keys])
    recon = render(g, np.stack([codes[k] for k in test_keys]), 3)
    for k, img, ref in zip(test_keys, images, recon, strict=True):
        np.testing.assert_array_equal(
            np.asarray(by[k, "yaw", 0.0]["w_plus"], np.float32), codes[k].reshape(-1)
        )
        # bound: the stage renders in batches of 4, this in 3: summation order can flip a uint8 rounding
        assert img.shape == (32, 32, 3) and np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    # the planted attribute and the fitted score rise with strength, for every row
    yaw = result.edits[0]
    # bound: yaw is linear in the features plus noise sd 0.5 on sd 15 (cap 0.9994); measured cv correlation
    # >= 0.9992 over 100 seeds; a useless fit's correlation on 300 rows has sd 0.058, so 0.9 is 15 null sd
    assert yaw.direction.info["quality"]["cv_correlation"] > 0.9
    for k in test_keys:
        w = {
            s: np.asarray(by[k, "yaw", s]["w_plus"], np.float32).reshape(g.n_styles, -1)
            for s in (-2.0, 0.0, 2.0)
        }
        truth = [w[s].mean(0) @ planted for s in (-2.0, 0.0, 2.0)]
        scores = [by[k, "yaw", s]["score"] for s in (-2.0, 0.0, 2.0)]
        assert truth[0] < truth[1] < truth[2] and scores[0] < scores[1] < scores[2]
        # bound: float32 rounding of w + s * v only: half an ulp of |w| < 8 is 4.8e-7, 20x under 1e-5 (both)
        np.testing.assert_allclose(w[2.0] - w[0.0], 2.0 * yaw.direction.vector, atol=1e-5)
        # the file direction moved layers [0, 4) only, and has no score
        e = np.asarray(by[k, "ifg", 1.5]["w_plus"], np.float32).reshape(g.n_styles, -1) - codes[k]
        np.testing.assert_allclose(e[:4], np.broadcast_to(1.5 * direction, (4, g.style_dim)), atol=1e-5)
        assert np.all(e[4:] == 0) and by[k, "ifg", 1.5]["score"] is None
    # shards are WebDataset tars: png + json per sample, names without directories
    prefix = result.prefix
    for shard in m["shards"]:
        with tarfile.open(fileobj=io.BytesIO(open(prefix.join(shard["path"]).path, "rb").read())) as tar:
            names = tar.getnames()
        assert len(names) == 2 * shard["images"] and all("/" not in n for n in names)
    # pictures: a row per sample, strengths ascending with the reconstruction in the middle
    assert result.grids["yaw"].shape == (3 * 34 + 2, 3 * 34 + 2, 3)
    assert result.grids["ifg"].shape == (3 * 34 + 2, 2 * 34 + 2, 3)  # reconstruction | +1.5
    # bound: the grid is rendered in another batch than the image: a uint8 rounding may flip by 1
    assert np.abs(result.grids["yaw"][2:34, 36:68].astype(int) - images[0].astype(int)).max() <= 1
    # the fitted direction is saved with its record
    saved = [f for f in list_files(resolve(root).join("edits", "directions")) if f.endswith(".json")]
    assert len(saved) == 1 and json.loads(open(saved[0]).read())["column"] == "yaw"
    # a re-run replaces the table: same rows, exactly the new manifest's files
    again = edit_from_params(p, ray_connect=False)
    assert again.prefix.uri == prefix.uri
    rows2 = open_table(prefix.uri, fmt=EDITS_FORMAT).to_table().to_pylist()
    assert sorted((r["key"], r["edit"], r["strength"], r["w_plus"]) for r in rows2) == sorted(
        (r["key"], r["edit"], r["strength"], r["w_plus"]) for r in rows
    )
    listed = {prefix.join(x["path"]).path for x in again.manifest["parts"] + again.manifest["shards"]}
    own = {prefix.join(n).path for n in ("_manifest.json", TABLE_STATS_NAME)}
    assert set(list_files(prefix)) == listed | own
    # SQL over the edits table (opened again: the re-run replaced the files the first handle read)
    t = open_table(prefix.uri, fmt=EDITS_FORMAT)
    n = t.query("SELECT count(*) AS n FROM edits WHERE edit = 'yaw' AND strength > 0").column("n")[0].as_py()
    assert n == 6
    assert t.to_table(filter=pc.field("strength") == 1.5, columns=["key"]).num_rows == 6


def test_folder_output_on_s3(rng, s3, ray_local):
    endpoint, bucket = s3
    options = StorageOptions(endpoint_url=endpoint)
    root = f"s3://{bucket}/data"
    uri, codes, _ = _table(root, rng, options)
    p = _edit_params(root, uri, endpoint, output="folder")
    result = edit_from_params(p, ray_connect=False)
    assert result.prefix.uri.startswith(f"{root}/edits/run-") and result.manifest["rows"] == 18
    t = open_table(result.prefix.uri, options, fmt=EDITS_FORMAT)
    uris = t.to_table(columns=["image"]).column("image").to_pylist()
    assert all(u.startswith(f"{result.prefix.uri}/images/yaw/") and u.endswith(".png") for u in uris)
    assert len(set(uris)) == 18 and all(img.shape == (32, 32, 3) for img in read_images(uris, options))
    assert result.grids["yaw"].shape == (3 * 34 + 2, 3 * 34 + 2, 3)


def _nothing_written(root: str) -> bool:
    return not list_files(resolve(root).join("edits"))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"where": "nosuch > 1"}, "nosuch"),
        ({"where": "split = = 'test'"}, "syntax error"),
        ({"where": "split = 'nope'"}, "matches no rows"),
        ({"edits": "wrong-shape"}, r"shape \(1, 512\) does not fit codes of shape \(8, 32\)"),
        ({"edits": "string-column"}, "only numeric or boolean"),
        ({"edits": "unknown-column"}, "cannot be fitted"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(rng, tmp_path, edit, match):
    root = str(tmp_path / "data")
    uri, _, _ = _table(root, rng)
    base = _edit_params(root, uri).edit.edits[0].__dict__
    if edit.get("edits") == "wrong-shape":
        edit = {"edits": [_ifg(tmp_path / "d.pt", np.zeros((1, 512)))]}
    elif edit.get("edits") == "string-column":
        edit = {"edits": [{**base, "column": "shard"}]}
    elif edit.get("edits") == "unknown-column":
        edit = {"edits": [{**base, "column": "smile"}]}
    with pytest.raises(EditError, match=match):
        edit_from_params(_edit_params(root, uri, **edit), ray_connect=False)
    assert _nothing_written(root)


def test_strengths_that_are_not_numbers_and_foreign_tables_are_refused(rng, tmp_path):
    root = str(tmp_path / "data")
    uri, _, _ = _table(root, rng, generator_sha="0" * 64)
    base = _edit_params(root, uri).edit.edits[0].__dict__
    with pytest.raises(ConfigError, match=r"edit.edits\[0\].strengths\[1\]: must be a number"):
        _edit_params(root, uri, edits=[{**base, "strengths": [1.0, "big"]}])
    with pytest.raises(ConfigError, match="repeated"):
        _edit_params(root, uri, edits=[{**base, "strengths": [1.0, 1.0]}])
    with pytest.raises(EditError, match="inverted for generator 000000000000"):
        edit_from_params(_edit_params(root, uri), ray_connect=False)
    with pytest.raises(EditError, match="_manifest.json is missing"):
        edit_from_params(_edit_params(root, str(tmp_path / "nothing")), ray_connect=False)
    assert _nothing_written(root)


def _params_file(tmp_path, root: str, uri: str) -> str:
    import yaml

    from mambastyle.config import to_dict

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(_edit_params(root, uri))))
    return str(path)


def test_cli_fits_a_direction_and_applies_named_edits(rng, tmp_path, ray_local, capsys):
    from mambastyle.cli import main

    root = str(tmp_path / "data")
    uri, codes, planted = _table(root, rng)
    pf = _params_file(tmp_path, root, uri)
    out = tmp_path / "dirs" / "yaw.npy"
    assert main(["edit", "fit-direction", uri, "--params", pf, "--column", "yaw", "--where",
                 "split = 'train'", "--out", str(out)]) == 0  # fmt: skip
    assert "cv_correlation" in capsys.readouterr().out
    record = json.loads(out.with_suffix(".json").read_text())
    # bound: as in the stage test: cv correlation >= 0.9992 and cosine >= 0.9992 measured over 100 seeds;
    # a random direction's cosine in 32 dims is 0 +- 0.18, so 0.9 is 5 null sd
    assert record["rows"] == SPLITS["train"] and record["quality"]["cv_correlation"] > 0.9
    assert np.load(out).shape == (1, 32) and float(np.load(out)[0] @ planted) > 0.9
    args = ["edit", "apply", "--params", pf, "--table", uri, "--where", "key IN ('img300', 'img301')",
            "--load", f"turn={out}", "--direction", "turn:-1,1:2-6", "--direction", "yaw:0.5",
            "--output", "folder", "--grids", str(tmp_path / "grids")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "6 edited rows (2 selected x 2 edits), 6 images" in printed
    prefix = printed.splitlines()[0].rsplit("-> ", 1)[1]
    t = open_table(prefix, fmt=EDITS_FORMAT).to_table().to_pylist()
    assert sorted((r["key"], r["edit"], r["strength"]) for r in t) == sorted(
        [(k, "turn", s) for k in ("img300", "img301") for s in (-1.0, 1.0)]
        + [(k, "yaw", 0.5) for k in ("img300", "img301")]
    )
    for r in (r for r in t if r["edit"] == "turn"):
        delta = np.asarray(r["w_plus"], np.float32).reshape(8, 32) - codes[r["key"]]
        # bound: +-1 times a unit vector; float32 rounding of 32 entries moves the norm by < 3e-6
        assert (
            np.all(delta[:2] == 0)
            and np.all(delta[6:] == 0)
            and np.allclose(np.linalg.norm(delta[2:6], axis=1), 1.0, atol=1e-4)
        )
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["turn.png", "yaw.png"]
    # bad specs fail with a message and exit status 1, before anything runs
    bad_specs = [
        (["--direction", "nope:1"], "unknown direction 'nope'"),
        (["--direction", "yaw:a,b"], "strength 'a' is not a number"),
        (["--direction", "yaw:1:x"], "layers must be START-STOP"),
        (["--ganspace", "g=f.pt", "--direction", "g:1"], "NAME=FILE#COMPONENT"),
    ]
    for bad, message in bad_specs:
        assert main(["edit", "apply", "--params", pf, "--table", uri, *bad]) == 1
        assert message in capsys.readouterr().err


def test_fit_direction_on_joined_boolean_labels(rng, tmp_path, capsys):
    from mambastyle.cli import main

    root = str(tmp_path / "data")
    uri, codes, _ = _table(root, rng)
    pf = _params_file(tmp_path, root, uri)
    keys = sorted(codes)
    # like a real attribute, planted along directions the codes vary in (the mapping network's
    # output fills few of W's directions; along the others a split is mostly per-layer noise)
    means = np.stack([codes[k].mean(0) for k in keys])
    _, _, vt = np.linalg.svd(means - means.mean(0), full_matrices=False)
    b = rng.normal(size=8) @ vt[:8]
    b /= np.linalg.norm(b)
    proj = np.array([codes[k].mean(0) @ b for k in keys])
    smiling = proj > np.median(proj)
    labelled = [k for i, k in enumerate(keys) if i % 4 != 3]  # not every row has a label
    lines = ["key,smiling"] + [f"{k},{'true' if smiling[keys.index(k)] else 'false'}" for k in labelled]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "smiling.npy"
    args = ["edit", "fit-direction", uri, "--params", pf, "--labels", str(tmp_path / "labels.csv"),
            "--column", "smiling", "--where", "split = 'train'", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "smiling (boolean" in capsys.readouterr().out
    record = json.loads(out.with_suffix(".json").read_text())
    train_labelled = [k for k in labelled if int(k[3:]) < SPLITS["train"]]
    # bound: a median split along b, 225 labelled rows; measured cv accuracy 0.92 +- 0.019 (min 0.86) over
    # 100 seeds, so 0.8 is 6 sd below the mean; chance is 0.5
    assert record["rows"] == len(train_labelled) and record["quality"]["cv_accuracy"] > 0.8
    assert record["labels"] == str(tmp_path / "labels.csv") and len(record["labels_sha256"]) == 64
    # the fitted direction recovers the planted one; bound: a random direction's cosine is about
    # 1/sqrt(style_dim), far below 0.6, and a few dozen labelled rows recover it well above
    # (measured 0.86 +- 0.04, min 0.68, over 100 seeds: 0.6 is 6.5 sd below; null sd 0.18: 3.4 null sd)
    assert float(np.load(out)[0] @ b) > 0.6
    # a labels file with repeated keys, without the column, or without keys is refused
    (tmp_path / "dup.csv").write_text("key,smiling\nimg000,true\nimg000,false\n")
    (tmp_path / "nokey.csv").write_text("name,smiling\nimg000,true\n")
    for name, message in (("dup.csv", "repeated keys"), ("nokey.csv", "need a 'key' column"),
                          ("labels.csv", "cannot be fitted")):  # fmt: skip
        column = "age" if name == "labels.csv" else "smiling"
        bad = ["edit", "fit-direction", uri, "--params", pf, "--labels", str(tmp_path / name),
               "--column", column, "--out", str(tmp_path / "x.npy")]  # fmt: skip
        assert main(bad) == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_cpu_actors_share_out_the_ray_instance_cpus(ray_local):
    from mambastyle.edit.stage import cpus_per_actor

    cpus = int(ray_local.cluster_resources()["CPU"])
    assert cpus_per_actor(1) == cpus
    assert cpus_per_actor(cpus) == 1
    assert cpus_per_actor(10 * cpus) == 1  # never zero


def test_bf16_edits_are_a_run_of_their_own_near_the_fp32_images(rng, tmp_path, ray_local):
    root = str(tmp_path / "data")
    uri, _, _ = _table(root, rng)
    fp32 = edit_from_params(_edit_params(root, uri), ray_connect=False)
    bf16 = edit_from_params(_edit_params(root, uri, precision="bf16"), ray_connect=False)
    assert bf16.prefix.uri != fp32.prefix.uri
    a = (
        open_table(fp32.prefix.uri, fmt=EDITS_FORMAT)
        .to_table()
        .sort_by([("key", "ascending"), ("strength", "ascending")])
    )
    b = open_table(bf16.prefix.uri, fmt=EDITS_FORMAT)
    assert b.metadata["precision"] == "bf16"
    b = b.to_table().sort_by([("key", "ascending"), ("strength", "ascending")])
    assert a.column("key").to_pylist() == b.column("key").to_pylist()
    # the codes are edited in float32 either way: identical; the images are rendered in bf16
    assert a.column("w_plus").to_pylist() == b.column("w_plus").to_pylist()
    ia = np.stack(read_images(a.column("image").to_pylist())).astype(int)
    ib = np.stack(read_images(b.column("image").to_pylist())).astype(int)
    # bound: as test_invert's bf16 test (measured 0.45 grey levels on average, 5 at most)
    assert np.abs(ia - ib).mean() < 2 and np.abs(ia - ib).max() < 32 and np.abs(ia - ib).max() > 0
