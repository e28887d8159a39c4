"""The `generator` DVC stage script: outputs, determinism, and use of a real checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image

from mambastyle.checkpoints import file_sha256, load_generator, save_generator
from mambastyle.models.stylegan2 import GeneratorConfig, build_generator


def run_stage(repo, params_path, out_dir):
    cmd = [
        sys.executable,
        str(repo / "pipelines" / "generator.py"),
        "--params",
        str(params_path),
        "--out",
        str(out_dir),
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def shipped(repo, **generator_overrides):
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["generator"]["latent_avg_samples"] = 512
    data["generator"].update(generator_overrides)
    return data


def test_stage_outputs_are_complete_and_deterministic(repo, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(shipped(repo)))
    for out in ("a", "b"):
        res = run_stage(repo, params, tmp_path / out)
        assert res.returncode == 0, res.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    assert sorted(p.name for p in a.iterdir()) == ["generator.pt", "info.json", "samples.png"]
    assert file_sha256(a / "generator.pt") == file_sha256(b / "generator.pt")
    assert (a / "samples.png").read_bytes() == (b / "samples.png").read_bytes()
    info = json.loads((a / "info.json").read_text())
    assert info["sha256"] == file_sha256(a / "generator.pt")
    assert info["n_styles"] == 10 and info["source"] == "random-init(seed=0)"
    g = load_generator(a / "generator.pt", resolution=64)
    assert g.latent_avg_source == "checkpoint"
    assert np.asarray(Image.open(a / "samples.png")).shape == (4 * 66 + 2, 4 * 66 + 2, 3)


def test_stage_uses_a_configured_checkpoint(repo, tmp_path):
    cfg = GeneratorConfig(resolution=32, style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=16)
    src = tmp_path / "ffhq.pt"
    save_generator(build_generator(cfg, seed=9), src)
    arch = {**cfg.to_dict()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(shipped(repo, checkpoint=str(src), architecture=arch)))
    res = run_stage(repo, params, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["source_sha256"] == file_sha256(src)
    assert info["config"]["resolution"] == 32


def test_stage_rejects_checkpoint_of_wrong_resolution(repo, tmp_path):
    src = tmp_path / "g.pt"
    save_generator(build_generator(GeneratorConfig(resolution=16, style_dim=8, n_mlp=1, channel_max=4)), src)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(shipped(repo, checkpoint=str(src))))
    res = run_stage(repo, params, tmp_path / "out")
    assert res.returncode != 0
    assert "16-px generator" in res.stderr and "64 px was asked for" in res.stderr
