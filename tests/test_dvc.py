"""The committed dvc.lock matches the code and params (so `make demo` reruns only what changed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_dvc_lock_is_current_for_code_and_params(repo):
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists() or shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs dvc and a git checkout")
    out = subprocess.run(
        [str(dvc), "status", "--json"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout or "{}")
    # Data a stage reads from an earlier stage (under data/) is absent in a fresh clone; only
    # code and params must match the lock.
    stale = {
        stage: [
            f"{k}: {path}" if isinstance(changes, dict) else k
            for entry in entries
            if isinstance(entry, dict)
            for k, changes in entry.items()
            if k in ("changed deps", "changed params")
            for path in (changes if isinstance(changes, dict) else [None])
            if path is None or not str(path).startswith("data/")
        ]
        for stage, entries in status.items()
    }
    stale = {stage: kinds for stage, kinds in stale.items() if kinds}
    assert not stale, f"dvc.lock is stale (run `dvc repro` and commit dvc.lock): {stale}"


def _params_changed(repo, tmp_path, edit) -> set[str]:
    """Stages whose params `dvc status` reports changed after ``edit(params dict)``, in a clone."""
    import yaml

    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists() or shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs dvc and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, timeout=120)
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):  # this checkout's, committed or not
        shutil.copy(repo / name, clone / name)
    data = yaml.safe_load((clone / "params.yaml").read_text())
    edit(data)
    (clone / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    out = subprocess.run(
        [str(dvc), "status", "--json"], cwd=clone, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout or "{}")
    return {  # params show up as a changed dependency on params.yaml
        stage
        for stage, entries in status.items()
        for entry in entries
        if isinstance(entry, dict) and "params.yaml" in (entry.get("changed deps") or {})
    }


def test_a_param_reruns_only_the_stages_that_read_it(repo, tmp_path):
    # the sample grid's size shapes only the generator stage's picture
    assert _params_changed(repo, tmp_path / "a", lambda p: p["generator"]["sample"].update(num=25)) == {
        "generator"
    }
    # a training param: train only (downstream stages follow through its output)
    assert _params_changed(repo, tmp_path / "b", lambda p: p["train"].update(steps=301)) == {"train"}
    # the generator's weights: every stage that uses the generator
    changed = _params_changed(repo, tmp_path / "c", lambda p: p["generator"].update(init_seed=1))
    assert changed == {"generator", "train", "invert", "evaluate", "edit"}


def test_generator_sample_settings_do_not_change_run_ids():
    import dataclasses

    from train_helpers import params

    from mambastyle.train.distributed import run_name

    p = params()
    other = dataclasses.replace(p.generator, sample=dataclasses.replace(p.generator.sample, num=3))
    assert run_name(p.train, other, b"m") == run_name(p.train, p.generator, b"m")
    seeded = dataclasses.replace(p.generator, init_seed=7)
    assert run_name(p.train, seeded, b"m") != run_name(p.train, p.generator, b"m")
