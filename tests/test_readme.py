"""The README stays true: its two commands, its command lines and its Python example."""

from __future__ import annotations

import re
import shlex

import pytest
from helpers import make_table

from mambastyle.cli import build_parser
from mambastyle.storage import resolve


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_first_block_is_the_two_commands_and_the_makefile_runs_them(repo):
    first = _blocks((repo / "README.md").read_text(), "bash")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
    make = (repo / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert "dvc repro" in demo and "mambastyle report" in demo
    assert "pytest" in re.search(r"^test:.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert "make test" in (repo / ".ci" / "run").read_text()


def _command_lines(text: str) -> list[list[str]]:
    lines = []
    for block in _blocks(text, "bash"):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #")[0].strip()
            if cmd.startswith(".venv/bin/mambastyle "):
                lines.append(shlex.split(cmd)[1:])
    return lines


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
