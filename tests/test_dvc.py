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
