"""The README stays true: its two commands, its command lines and its Python example."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from helpers import make_table

from mambastyle.cli import build_parser
from mambastyle.storage import resolve


def _blocks(text: str, lang: str) -> list[str]:
    """The contents of the fenced blocks whose info string is ``lang`` ("" for plain fences)."""
    found, current, info = [], None, ""
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


def test_the_first_block_is_the_two_commands_and_the_makefile_runs_them(repo):
    first = _blocks((repo / "README.md").read_text(), "bash")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
    make = (repo / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert "dvc repro" in demo and "mambastyle report" in demo
    assert "pytest" in re.search(r"^test:.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert "make test" in (repo / ".ci" / "run").read_text()


def _commands(text: str) -> list[list[str]]:
    """Every command line of the README's bash blocks, split as the shell would."""
    lines = []
    for block in _blocks(text, "bash"):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #")[0].strip()
            if cmd and not cmd.startswith("#"):
                lines.append(shlex.split(cmd))
    return lines


def _command_lines(text: str) -> list[list[str]]:
    return [argv[1:] for argv in _commands(text) if argv[0] == "mambastyle"]


def test_commands_assume_the_activated_environment(repo):
    """After the one activation step the README shows, commands are called by name; a path into
    .venv/ would hide that the step is needed (DVC's stages call `python` from PATH)."""
    commands = _commands((repo / "README.md").read_text())
    assert commands[2] == [".", ".venv/bin/activate"]  # right after the two commands
    assert not [c for c in commands if c[0].startswith((".venv/", "PATH="))]


def test_every_mambastyle_command_line_in_the_readme_parses(repo):
    lines = _command_lines((repo / "README.md").read_text())
    assert len(lines) >= 10
    parser = build_parser()
    for argv in lines:
        if argv == ["--help"]:
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: mambastyle {' '.join(argv)}")
        assert callable(args.func)


def test_every_dvc_command_parses_and_every_override_gives_valid_params(repo, tmp_path):
    """Each `dvc ...` line goes through DVC's own argument parser; each `-S` value through DVC's
    override code (Hydra's grammar) onto a copy of params.yaml, which must then load."""
    pytest.importorskip("dvc")
    from dvc.cli import parse_args
    from dvc.utils.hydra import apply_overrides

    from mambastyle.config import load_params

    dvc_lines = [argv[1:] for argv in _commands((repo / "README.md").read_text()) if argv[0] == "dvc"]
    overrides = 0
    for argv in dvc_lines:
        args = parse_args(argv)
        assert args.func is not None, argv
        for override in getattr(args, "set_param", None) or []:
            work = tmp_path / "params.yaml"
            shutil.copy(repo / "params.yaml", work)
            apply_overrides(str(work), [override])
            load_params(work)
            overrides += 1
    assert overrides >= 5  # the experiments section and the pretrained-encoder example


def _fresh_shell(repo) -> dict[str, str]:
    """The environment of a new login shell: no virtualenv on PATH."""
    if not (repo / ".venv" / "bin" / "activate").is_file():
        pytest.skip("needs the project's .venv (made by `make venv`)")
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip


# verbs cheap enough to run for real (the rest are parsed above)
CHEAP = {("--help",), ("config", "validate"), ("config", "show"), ("encoder", "list"), ("encoder", "info"),
         ("report",)}  # fmt: skip


def test_cheap_commands_run_in_a_fresh_shell_after_the_activation_step(repo):
    env = _fresh_shell(repo)
    lines = [
        a for a in _command_lines((repo / "README.md").read_text()) if CHEAP & {tuple(a[:1]), tuple(a[:2])}
    ]
    assert len(lines) >= 4
    for argv in lines:
        script = ". .venv/bin/activate && mambastyle " + shlex.join(argv)
        run = subprocess.run(
            ["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, f"{script}\n{run.stderr[-2000:]}"


def test_a_stage_without_the_environment_fails_in_one_line(repo, tmp_path):
    """DVC runs `python -m pipelines.X` with the `python` first on PATH; one that cannot import the
    project (``-S``: no site-packages) stops before any import with the step that fixes it."""
    run = subprocess.run([sys.executable, "-S", "-m", "pipelines.prepare", "--params", "params.yaml",
                          "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m")],
                         cwd=repo, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and ". .venv/bin/activate" in lines[0] and "cannot be imported" in lines[0], (
        run.stderr
    )
    assert not (tmp_path / "out").exists()


def test_the_python_example_runs_on_a_table(repo, tmp_path):
    (code,) = _blocks((repo / "README.md").read_text(), "python")
    table = tmp_path / "latents" / "run-x"
    truth = make_table(resolve(str(table)), n_per_split=(12, 5))
    scope: dict = {}
    exec(code.replace("data/latents/run-...", str(table)), scope)  # noqa: S102 (the README's own code)
    assert sorted(scope["test"].column("key").to_pylist()) == sorted(k for k in truth if k.startswith("test"))
    assert scope["codes"].shape == (5, 4, 8)
    assert set(scope["df"]["key"]) == {
        k for k in truth if scope["frame"].set_index("key").loc[k, "mse"] < 0.05
    }
    assert len(scope["frame"]) == len(truth)


def test_the_report_block_shows_the_committed_metrics(repo):
    """The demo's figures in the README are those of `metrics/` (the pipeline's own output, which
    dvc.lock pins): re-running the demo with changed code shows up here as a failure."""
    import json

    block = next(b for b in _blocks((repo / "README.md").read_text(), "") if b.startswith("generator "))
    m = {p.stem: json.loads(p.read_text()) for p in (repo / "metrics").glob("*.json")}
    counts, samples = m["prepare"]["counts"], m["prepare"]["samples"]
    splits = ", ".join(f"{k} {v}" for k, v in sorted(samples.items()))
    quality, fused = m["evaluate"]["quality"], m["evaluate"]["fuser"]
    expected = [
        f"({splits})",
        f"{counts['inputs']} inputs = {counts['written']} faces written + {counts['quarantined']} quar",
        f"step {m['train']['step']}",
        f"step {m['fuser']['step']}",
        f"({m['invert']['counts']['rows']} rows: {splits})",
        f"{m['evaluate']['images']} images: mse {quality['mse']:.4g}, ssim {quality['ssim']:.4g}",
        f"with the fuser: mse {fused['mse']:.4g}, ssim {fused['ssim']:.4g}",
        f"({m['edit']['counts']['rows']} rows, {m['edit']['counts']['images']} images",
    ]
    assert not [e for e in expected if e not in block], block
