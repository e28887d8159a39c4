"""The repository's own import graph, read from the source (lazy imports included).

Anything keyed on "the code that produced this" derives its file list from here: the run ids
of training (resume only with the same code), the cache key of prepare's work units, and the
test that every DVC stage lists the files it imports. A hand-kept list drifts the first time a
module gains an import; the graph cannot.

Standard library only, so every layer may use it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mambastyle", "pipelines")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a repository module (``pkg.mod`` -> pkg/mod.py or pkg/mod/__init__.py)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _direct(path: Path, root: Path) -> frozenset[str]:
    """Repository modules that ``path`` imports anywhere in its body (functions included)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import mod`
    out: set[str] = set()
    for mod in found:
        if mod.split(".")[0] not in PACKAGES:
            continue
        # a module and every package above it run on import
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate != name and module_file(candidate, root) is not None:
                out.add(candidate)
    return frozenset(out)


def imports(name: str, root: Path = ROOT) -> frozenset[str]:
    """The modules ``name`` imports directly (repository modules only)."""
    path = module_file(name, root)
    if path is None:
        raise ModuleNotFoundError(f"{name} is not a module of this repository ({root})")
    return _direct(path, root)


def closure(*names: str, root: Path = ROOT) -> list[str]:
    """``names`` and every repository module they reach, sorted."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imports(name, root) - seen)
    return sorted(seen)


def files(*names: str, root: Path = ROOT) -> list[Path]:
    """The source files of ``closure(*names)``."""
    return [module_file(n, root) for n in closure(*names, root=root)]  # type: ignore[misc]


def graph(root: Path = ROOT) -> dict[str, frozenset[str]]:
    """Every repository module and what it imports."""
    paths = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    mods = sorted(_module_name(p, root) for p in paths)
    return {m: imports(m, root) for m in mods}


def cycles(g: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in g.get(v, ()):
                out.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def source_hash(*names: str, salt: str = "", root: Path = ROOT) -> str:
    """sha256 over the closure's files (path and bytes), so any change to code they run changes it."""
    h = hashlib.sha256(salt.encode())
    for path in files(*names, root=root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
