"""What a run did: a stats record written next to each stage's manifest (``stats.json``).

The record answers the questions of a long run on a large dataset: how many inputs there were,
how many were computed and how many reused from earlier work, how many outputs were written,
which inputs were quarantined and why (or failed), how long each phase took and the throughput.
The counts add up: ``inputs == computed + reused``. Inputs are photos for prepare (``written``:
faces, which with ``multi_face: each`` may be several per photo), faces for invert (``written``:
rows) and selected rows for edit (``written``: edited rows, one per edit and strength).
``mambastyle report`` and the CLI verbs' ``--json`` show it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

STATS_NAME = "stats.json"  # beside the shards' manifest.json
TABLE_STATS_NAME = "_stats.json"  # beside a table's _manifest.json (underscored like it: not a part)
STATS_VERSION = 1


@dataclass
class RunStats:
    """Counters and phase timings of one run of ``stage`` (see the module docstring)."""

    stage: str
    inputs: int = 0
    computed: int = 0
    reused: int = 0
    written: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)  # reason -> inputs
    failed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall seconds
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to phase ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def to_dict(self) -> dict:
        total = sum(self.seconds.values())
        return {
            "format": "mambastyle-run-stats",
            "version": STATS_VERSION,
            "stage": self.stage,
            "started": self.started,
            "inputs": self.inputs,
            "computed": self.computed,
            "reused": self.reused,
            "written": self.written,
            "quarantined": sum(self.quarantined.values()),
            "quarantine_reasons": dict(sorted(self.quarantined.items())),
            "failed": self.failed,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "seconds_total": round(total, 3),
            # computed inputs per second of the whole run (reused ones cost next to nothing)
            "items_per_s": round(self.computed / total, 3) if total > 0 else None,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()
