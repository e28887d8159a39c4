"""The console script: help, a working `generator sample`, clean failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mambastyle.checkpoints import save_generator
from mambastyle.cli import main
from mambastyle.models.stylegan2 import GeneratorConfig, build_generator


@pytest.fixture
def params(repo, tmp_path):
    """The shipped params with a cheap latent_avg sample."""
    text = (repo / "params.yaml").read_text().replace("latent_avg_samples: 10000", "latent_avg_samples: 256")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_console_script_help():
    exe = Path(sys.executable).with_name("mambastyle")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "generator" in out and "config" in out
    out = subprocess.run(
        [str(exe), "generator", "sample", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--checkpoint" in out and "--out" in out


def test_sample_default_generator_writes_grid(params, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generator", "sample", "--params", str(params), "--out", str(out), "--num", "6"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    img = np.asarray(Image.open(out))
    # 6 images of 64 px -> 3 columns x 2 rows with 2-px gutters
    assert img.shape == (2 * 66 + 2, 3 * 66 + 2, 3)
    assert img[2:66, 2:66].std() > 0  # a real picture, not a blank tile
    # same seed, same picture
    again = tmp_path / "again.png"
    main(["generator", "sample", "--params", str(params), "--out", str(again), "--num", "6"])
    assert np.array_equal(np.asarray(Image.open(again)), img)


def test_sample_any_checkpoint(params, tmp_path):
    g = build_generator(GeneratorConfig(resolution=32, style_dim=32, n_mlp=2, channel_max=8), seed=5)
    save_generator(g, tmp_path / "g.pt")  # no latent_avg: computed on load
    out = tmp_path / "grid.png"
    args = ["generator", "sample", "--params", str(params), "--checkpoint", str(tmp_path / "g.pt")]
    assert (
        main([*args, "--out", str(out), "--num", "4", "--noise-mode", "random", "--truncation", "0.5"]) == 0
    )
    assert np.asarray(Image.open(out)).shape == (2 * 34 + 2, 2 * 34 + 2, 3)


def test_info_json(params, capsys):
    assert main(["generator", "info", "--params", str(params), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_styles"] == 10
    assert info["config"]["resolution"] == 64
    assert info["parameters"]["total"] == sum(
        p.numel()
        for p in build_generator(
            GeneratorConfig(**{**info["config"], "blur_kernel": (1, 3, 3, 1)})
        ).parameters()
    )


def test_bad_checkpoint_fails_cleanly(params, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    code = main(
        [
            "generator",
            "sample",
            "--params",
            str(params),
            "--checkpoint",
            str(bad),
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a PyTorch checkpoint" in err
    assert not (tmp_path / "x.png").exists()


def test_wrong_resolution_checkpoint_fails_cleanly(params, tmp_path, capsys):
    torch.save(
        {
            "g_ema": build_generator(
                GeneratorConfig(resolution=16, style_dim=8, n_mlp=1, channel_max=4)
            ).state_dict()
        },
        tmp_path / "g.pt",
    )
    args = [
        "generator",
        "info",
        "--params",
        str(params),
        "--checkpoint",
        str(tmp_path / "g.pt"),
        "--resolution",
        "64",
    ]
    assert main(args) == 1
    assert "16-px generator" in capsys.readouterr().err


def test_bad_params_exit_2_and_name_the_key(tmp_path, repo, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text((repo / "params.yaml").read_text().replace("noise_mode: const", "noise_mode: loud"))
    assert main(["config", "validate", "--params", str(bad)]) == 2
    assert "generator.sample.noise_mode" in capsys.readouterr().err


def test_config_show_round_trips(params, capsys):
    assert main(["config", "show", "--params", str(params), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["generator"]["architecture"]["resolution"] == 64


def test_encoder_list_and_info(capsys):
    from mambastyle.models.encoders import ENCODERS, build_encoder

    assert main(["encoder", "list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(ENCODERS)
    assert main(["encoder", "info", "mambastyle_tiny", "--resolution", "256", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_styles"] == 14 and info["input_size"] == 256
    assert info["parameters"] == sum(p.numel() for p in build_encoder("mambastyle_tiny", 256).parameters())
    assert info["scan_backend"] in info["scan_backends_available"]
    assert main(["encoder", "info", "mambastyle", "--resolution", "1024"]) == 0
    assert "parameters      56,754,560" in capsys.readouterr().out
    assert main(["encoder", "info", "nope"]) == 1
    assert "unknown encoder 'nope'" in capsys.readouterr().err


def test_data_prepare_and_verify(params, tmp_path, capsys):
    out = tmp_path / "root"
    prep = ["data", "prepare", "--params", str(params), "--output", str(out), "--size", "32"]
    assert main([*prep, "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "29 inputs = 22 written + 7 quarantined" in text and "quarantined no_face: 2" in text
    assert main(["data", "verify", "--params", str(params), str(out)]) == 0
    shard = sorted((out / "shards" / "train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["data", "verify", "--params", str(params), str(out)]) == 1
    assert "1 shard(s) do not match" in capsys.readouterr().err
    assert main([*prep, "--input", str(tmp_path / "none")]) == 1
    assert "no input files" in capsys.readouterr().err


def test_nothing_usable_fails_in_one_line_with_the_counts_and_invert_fails_before_ray(
    params, tmp_path, capsys
):
    import ray

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.jpg").write_bytes(b"a text file named like a photo")
    root = tmp_path / "root"
    args = ["data", "prepare", "--params", str(params), "--input", str(photos), "--output", str(root)]
    assert main([*args, "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no face written: 1 inputs, 1 quarantined" in err[0], err
    assert (root / "shards" / "quarantine.jsonl").read_text().count("\n") == 1  # kept for inspection
    assert main(["latents", "invert", "--params", str(params), "--root", str(root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lists no faces (1 inputs, 1 quarantined" in err[0], err
    assert not ray.is_initialized()


def test_an_unreachable_s3_endpoint_is_one_line(params, tmp_path, capsys, monkeypatch):
    from helpers import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-only")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-only")
    import yaml

    data = yaml.safe_load(params.read_text())
    data["storage"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    params.write_text(yaml.safe_dump(data))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not a photo")
    args = ["data", "prepare", "--params", str(params), "--input", str(photos), "--output", "s3://bucket/x"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "127.0.0.1" in err[0], err


def test_a_query_naming_the_wrong_table_lists_the_right_one(tmp_path, capsys):
    from helpers import make_table

    from mambastyle.storage import resolve

    table = tmp_path / "latents" / "run-x"
    make_table(resolve(str(table)), n_per_split=(3, 2))
    assert main(["latents", "query", str(table), "SELECT count(*) FROM edits"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "queried as `latents`" in err[0] and "w_plus" in err[0], err
    assert "pg_settings" not in err[0]


def test_encoder_info_states_the_style_width_it_was_built_for(capsys):
    assert main(["encoder", "info", "mambastyle_tiny", "--resolution", "64", "--style-dim", "64"]) == 0
    assert "10 styles of 64" in capsys.readouterr().out
    assert main(["encoder", "info", "psp", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["style_dim"] == 512


def test_json_prints_the_run_statistics(params, tmp_path, capsys):
    """`data prepare --json` prints one JSON object: the run's statistics, counts adding up."""
    from mambastyle.data.demo import demo_files

    root = tmp_path / "root"
    assert (
        main(["data", "prepare", "--params", str(params), "--output", str(root), "--workers", "1", "--json"])
        == 0
    )
    stats = json.loads(capsys.readouterr().out)
    n = len(demo_files())
    assert stats["inputs"] == n == stats["computed"] + stats["reused"] and stats["reused"] == 0
    assert (
        stats["written"] + stats["quarantined"]
        == n
        == sum(stats["quarantine_reasons"].values()) + stats["written"]
    )
    assert stats == json.loads((root / "shards" / "stats.json").read_text())


def test_edit_apply_defaults_to_the_invert_stage_table(params, tmp_path, capsys):
    """Without --table (and edit.table null), `edit apply` edits the table the invert stage's record
    names, and says what to do when that stage has not run."""
    record_dir = tmp_path / "invert"
    args = ["edit", "apply", "--params", str(params), "--invert-out", str(record_dir)]
    assert main(args) == 1
    missing = record_dir / "manifest.json"
    err = capsys.readouterr().err
    assert f"no latent table: give --table (or run the invert stage: {missing} is missing)" in err
    record_dir.mkdir()
    table = tmp_path / "no-such-table"
    (record_dir / "manifest.json").write_text(json.dumps({"table": str(table), "metadata": {}}))
    assert main(args) == 1
    assert f"no latent table at {table}: _manifest.json is missing" in capsys.readouterr().err
