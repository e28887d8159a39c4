"""The committed dvc.lock matches the code and params (so `make demo` reruns only what changed)."""

from __future__ import annotations

import json
import os
import re
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
    # the metrics in git are the locked stages' own outputs (neither stale nor edited by hand)
    metrics = [
        f"{stage}: {path} {how}"
        for stage, entries in status.items()
        for entry in entries
        if isinstance(entry, dict)
        for path, how in (entry.get("changed outs") or {}).items()
        if str(path).startswith("metrics/")
    ]
    assert not metrics, f"metrics/ differs from dvc.lock (run `dvc repro`, commit both): {metrics}"


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
    assert changed == {"generator", "train", "fuser", "invert", "evaluate", "edit"}
    # a fuser param: the fuser and the invert stage (which uses it); the rest follow through outputs
    assert _params_changed(repo, tmp_path / "d", lambda p: p["fuser"].update(steps=201)) == {
        "fuser",
        "invert",
    }


def test_generator_sample_settings_do_not_change_run_ids():
    import dataclasses

    from helpers import params

    from mambastyle.runs import run_id

    p = params()
    other = dataclasses.replace(p.generator, sample=dataclasses.replace(p.generator.sample, num=3))
    assert run_id(p.train, other, b"m") == run_id(p.train, p.generator, b"m")
    seeded = dataclasses.replace(p.generator, init_seed=7)
    assert run_id(p.train, seeded, b"m") != run_id(p.train, p.generator, b"m")


def _clone_with_env(repo, tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """A git clone of ``repo`` carrying this checkout's pipeline files, its dvc, and an env for it."""
    import os

    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists() or shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs dvc and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, timeout=120)
    # the working tree as it is (tracked and new files), committed: the clone is this checkout
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (repo / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, clone / name)
        elif (clone / name).exists():  # deleted in the working tree
            (clone / name).unlink()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # stage `python`
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }  # fmt: skip
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "working tree", "--allow-empty"], cwd=clone, check=True, env=env)
    return clone, dvc, env


def _sh(cmd, cwd, env, ok=True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _errors(node, path="") -> list[str]:
    """Every non-empty ``error`` entry in `dvc exp show --json` (a metric or param that failed to load)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "error" and value:
                found.append(f"{path}: {value}")
            else:
                found += _errors(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _errors(value, f"{path}[{i}]")
    return found


def _sample_nums(node, found=None) -> dict[str, int]:
    """rev -> generator.sample.num for every revision in `dvc exp show --json` (baseline, experiments)."""
    found = {} if found is None else found
    if isinstance(node, dict):
        params = ((node.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data", {})
        if node.get("rev") not in (None, "workspace") and "generator" in params:
            found[node["rev"]] = params["generator"]["sample"]["num"]
        for value in node.values():
            _sample_nums(value, found)
    elif isinstance(node, list):
        for value in node:
            _sample_nums(value, found)
    return found


def test_dvc_exp_run_sets_a_param_and_runs_the_stage(repo, tmp_path):
    import yaml

    clone, dvc, env = _clone_with_env(repo, tmp_path)
    _sh([str(dvc), "exp", "run", "-S", "generator.sample.num=4", "generator"], clone, env)
    # the experiment ran with the value: the stage's record, the workspace params and the lock agree
    info = json.loads((clone / "data/generator/info.json").read_text())
    assert info["sample"]["num"] == 4
    assert yaml.safe_load((clone / "params.yaml").read_text())["generator"]["sample"]["num"] == 4
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert lock["stages"]["generator"]["params"]["params.yaml"]["generator"]["sample"]["num"] == 4
    # and the experiment is recorded under a name with its params (`dvc exp show`)
    shown = json.loads(_sh([str(dvc), "exp", "show", "--json"], clone, env).stdout)
    head = yaml.safe_load(_sh(["git", "show", "HEAD:params.yaml"], clone, env).stdout)
    assert sorted(_sample_nums(shown).values()) == sorted([4, head["generator"]["sample"]["num"]])
    # every revision's metrics load (they are in git), and the experiment changed only what it set
    assert not _errors(shown), _errors(shown)
    diff = _sh([str(dvc), "metrics", "diff"], clone, env)
    assert "failed to load" not in diff.stdout + diff.stderr
    status = _sh(["git", "status", "--porcelain"], clone, env).stdout.split("\n")
    assert {line[3:] for line in status if line} <= {"params.yaml", "dvc.lock"}, status
    # a value the params loader refuses fails the experiment with the key named
    bad = _sh([str(dvc), "exp", "run", "-S", "generator.sample.num=0", "generator"], clone, env, ok=False)
    assert bad.returncode != 0 and "generator.sample.num" in bad.stdout + bad.stderr


def test_dvc_remote_on_s3_round_trip_keeps_credentials_out_of_git(repo, tmp_path, s3):
    import hashlib

    import boto3

    endpoint, bucket = s3
    clone, dvc, env = _clone_with_env(repo, tmp_path)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(key, None)  # the remote's credentials come from .dvc/config.local alone
    _sh([str(dvc), "repro", "generator"], clone, env)
    secret = "not-in-git-" + bucket
    for cmd in (
        ["remote", "add", "-d", "store", f"s3://{bucket}/dvc-store"],
        ["remote", "modify", "store", "endpointurl", endpoint],
        ["remote", "modify", "--local", "store", "access_key_id", "testing"],
        ["remote", "modify", "--local", "store", "secret_access_key", secret],
    ):
        _sh([str(dvc), *cmd], clone, env)
    _sh([str(dvc), "push", "generator"], clone, env)
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        .list_objects_v2(Bucket=bucket, Prefix="dvc-store/")
        .get("Contents", [])
    ]
    model = clone / "data/generator/generator.pt"
    digest = hashlib.md5(model.read_bytes()).hexdigest()
    assert any(k.endswith(digest[2:]) for k in keys), keys
    # what git would commit names the remote but holds no credential
    committed = _sh(["git", "status", "--porcelain", "--untracked-files=all"], clone, env).stdout
    assert ".dvc/config.local" not in committed and ".dvc/config" in committed
    assert secret not in (clone / ".dvc/config").read_text()
    # a fresh copy of the outputs comes back from the remote
    shutil.rmtree(clone / ".dvc/cache")
    model.unlink()
    _sh([str(dvc), "pull", "generator"], clone, env)
    assert hashlib.md5(model.read_bytes()).hexdigest() == digest


def test_plots_page_draws_its_curves_without_internet(repo, tmp_path):
    """`dvc plots show` with the project's template: Vega's scripts are inside the page (none is
    loaded from the internet), and a headless browser, when one is installed, draws the curve."""
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists() or shutil.which("git") is None:
        pytest.skip("needs dvc and git")
    import configparser

    config = configparser.ConfigParser()
    config.read(repo / ".dvc" / "config")
    template = (repo / ".dvc" / config["plots"]["html_template"]).resolve()
    assert template.is_file() and template.is_relative_to(repo)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid"}
    _sh(["git", "init", "-q"], tmp_path, env)
    _sh([str(dvc), "init", "-q"], tmp_path, env)
    (tmp_path / "loss.tsv").write_text("step\tloss\n" + "".join(f"{i}\t{1 / (i + 1)}\n" for i in range(20)))
    (tmp_path / "dvc.yaml").write_text("plots:\n  - loss.tsv:\n      x: step\n")
    _sh([str(dvc), "plots", "show", "--html-template", str(template), "-o", "out"], tmp_path, env)
    page = (tmp_path / "out" / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script is loaded from outside the page"
    assert "vega@5.20.2" in page and "vega-lite@5.2.0" in page and "vega-embed@6.18.2" in page
    assert "loss.tsv" in page and "vegaEmbed(" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"]
    page_uri = (tmp_path / "out" / "index.html").as_uri()
    dom = subprocess.run([browser, *flags, page_uri], capture_output=True, text=True, timeout=120)
    assert "<svg" in dom.stdout or "<canvas" in dom.stdout, dom.stderr[-2000:]
