"""The command line every DVC stage script (``pipelines/*.py``) shares.

It sits on top with the CLI: it reads params.yaml, so nothing below may import it.

A stage writes two kinds of local files: its records under ``--out`` (``data/{stage}/``,
ignored by git: where the data went, full detail for ``mambastyle report``) and its headline
metrics under ``--metrics`` (``metrics/``, tracked by git: the few numbers ``dvc exp show`` and
``dvc metrics diff`` compare, and the training curves ``dvc plots diff`` draws). Metrics live in
git, not in DVC's cache, so every commit and experiment carries its own and a fresh clone can
compare them without a remote.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mambastyle.config import load_params
from mambastyle.errors import InvalidConfig
from mambastyle.locks import RootLocked


def stage_main(argv, doc: str, default_out: str, run, errors: tuple[type[BaseException], ...], log,
               show=None, invert_out: bool = False) -> int:  # fmt: skip
    """The command line of a DVC stage script (``pipelines/*.py``): ``--params``, ``--out``,
    ``--metrics`` (and ``--invert-out`` for stages that read the invert stage's records), logging
    to stderr, then ``run(params, out, metrics[, invert_out])``. An expected failure (one of
    ``errors``, or a params error) is logged as one line and exits 1; otherwise ``show(result)``,
    when given, is printed as JSON.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=default_out, help="local directory for the stage's records")
    parser.add_argument("--metrics", default="metrics", help="local directory for the headline metrics")
    if invert_out:
        parser.add_argument("--invert-out", default="data/invert", help="the invert stage's local outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        extra = (Path(args.invert_out),) if invert_out else ()
        result = run(load_params(args.params), Path(args.out), Path(args.metrics), *extra)
    # OSError: storage (local or S3) refused or unreachable; RootLocked: another run writes the root
    except (InvalidConfig, OSError, RootLocked, *errors) as exc:
        log.error("%s", exc)
        return 1
    if show is not None:
        print(json.dumps(show(result)))
    return 0


def write_metrics(path: Path, values: dict) -> None:
    """A headline metrics file: sorted keys, floats to 6 significant digits (the last float32 bits
    vary with how rows were batched, and a metric that moves for that reason is noise in a diff)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(values), indent=2, sort_keys=True) + "\n")


def rounded(value):
    """Floats to 6 significant digits, recursively."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def invert_record(invert_out: str | Path = "data/invert") -> dict | None:
    """The invert stage's last record here (``table``, and the encoder and fuser it was inverted
    with under ``metadata``), or None where that stage has not run: what "the invert stage's
    table" means to the stages, commands and service that default to it."""
    path = Path(invert_out) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None
