"""Shared fixtures. Tests never download anything and leave no server running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep any Ray instance a test starts on loopback (must be set before Ray starts).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_torch_seed():
    """Each test draws its own fresh random inputs, but failures can be reproduced."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield
    # pytest shows this on failure via the captured output
    print(f"torch seed for this test: {seed}")


@pytest.fixture
def repo() -> Path:
    return REPO
