"""The allocator settings of the stages' model actors, for a benchmark's own process."""

from __future__ import annotations

import os
import sys


def restart_with_allocator_env() -> None:
    """Re-executes this script with :data:`mambastyle.runtime.ALLOCATOR_ENV` added where unset.

    glibc reads these variables when a process starts, and the stages' actors get them; a bare
    baseline measured without them page-faults its activations in on every forward pass and
    understates what the model itself can do."""
    from mambastyle.runtime import ALLOCATOR_ENV

    missing = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})
