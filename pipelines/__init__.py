"""The DVC stage scripts (``python -m pipelines.STAGE``), one per stage of dvc.yaml.

DVC runs each stage's command in a shell with the ``python`` first on ``PATH``. When that is not
the project's environment (a fresh shell, ``.venv/bin/dvc`` called by its path), the stage would
die deep in an import with a traceback; this check turns that into one line naming the fix.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

# what every stage imports before doing anything (the package and its heavy dependencies)
REQUIRED = ("mambastyle", "torch", "yaml", "numpy", "pyarrow", "ray")


def missing_modules(names=REQUIRED) -> list[str]:
    """The top-level modules among ``names`` that this interpreter cannot import."""
    return [name for name in names if find_spec(name) is None]


def environment_error(missing: list[str]) -> str:
    return (
        f"{', '.join(missing)} cannot be imported by {sys.executable} (the `python` first on PATH): "
        "activate the project's environment first with `. .venv/bin/activate` (made by `make venv`), "
        "or install the package into this interpreter"
    )


if _missing := missing_modules():
    raise SystemExit(environment_error(_missing))
