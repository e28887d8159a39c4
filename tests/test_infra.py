"""Deployment files parse and keep large local state out of uploads."""

from __future__ import annotations

import yaml


def test_runtime_env_excludes_local_state(repo):
    env = yaml.safe_load((repo / "infra" / "runtime-env.yaml").read_text())
    assert env["working_dir"] == "."
    excludes = set(env["excludes"])
    for path in (".venv/", ".git/", "data/", ".dvc/cache/"):
        assert path in excludes, path
    # everything git ignores as generated data must not be uploaded either
    ignored = {line.strip().lstrip("/") for line in (repo / ".gitignore").read_text().splitlines()}
    for path in ("data/", "dvclive/", ".venv/"):
        assert path in ignored
