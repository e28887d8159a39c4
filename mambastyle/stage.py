"""The command line every DVC stage script (``pipelines/*.py``) shares.

It sits on top with the CLI: it reads params.yaml, so nothing below may import it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mambastyle.config import load_params
from mambastyle.errors import InvalidConfig


def stage_main(argv, doc: str, default_out: str, run, errors: tuple[type[BaseException], ...], log,
               show=None, invert_out: bool = False) -> int:  # fmt: skip
    """The command line of a DVC stage script (``pipelines/*.py``): ``--params``, ``--out`` (and
    ``--invert-out`` for stages that read the invert stage's records), logging to stderr, then
    ``run(params, out[, invert_out])``. An expected failure (one of ``errors``, or a params error)
    is logged as one line and exits 1; otherwise ``show(result)``, when given, is printed as JSON.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=default_out, help="local directory for the DVC outputs")
    if invert_out:
        parser.add_argument("--invert-out", default="data/invert", help="the invert stage's local outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        extra = (Path(args.invert_out),) if invert_out else ()
        result = run(load_params(args.params), Path(args.out), *extra)
    except (InvalidConfig, *errors) as exc:
        log.error("%s", exc)
        return 1
    if show is not None:
        print(json.dumps(show(result)))
    return 0
