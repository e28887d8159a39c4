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


def _sources(folder: Path) -> list[Path]:
    """The Python source files below ``folder``."""
    return [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _imported_names(path: Path, root: Path) -> frozenset[str]:
    """Every module name ``path`` imports anywhere in its body (functions included), absolute."""
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
    return frozenset(found)


@functools.cache
def _direct(path: Path, root: Path) -> frozenset[str]:
    """Repository modules that ``path`` imports (and the packages above them, which run too)."""
    name = _module_name(path, root)
    out: set[str] = set()
    for mod in _imported_names(path, root):
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


def external(name: str, root: Path = ROOT) -> frozenset[str]:
    """Top-level packages outside the repository that ``name`` imports (``ray``, ``torch``...)."""
    path = module_file(name, root)
    if path is None:
        raise ModuleNotFoundError(f"{name} is not a module of this repository ({root})")
    tops = {m.split(".")[0] for m in _imported_names(path, root) if m}
    return frozenset(tops - set(PACKAGES))


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
        # the packages above a module run first (``python -m pkg.mod`` included)
        parents = (name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1))
        todo.extend(p for p in parents if p not in seen and module_file(p, root) is not None)
    return sorted(seen)


def files(*names: str, root: Path = ROOT) -> list[Path]:
    """The source files of ``closure(*names)``."""
    return [module_file(n, root) for n in closure(*names, root=root)]  # type: ignore[misc]


def graph(root: Path = ROOT) -> dict[str, frozenset[str]]:
    """Every repository module and what it imports."""
    mods = sorted(_module_name(p, root) for pkg in PACKAGES for p in _sources(root / pkg))
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


def dvc_deps(*names: str, root: Path = ROOT) -> list[str]:
    """The code deps a DVC stage running ``names`` needs: the closure's files, a whole package
    folder where every module in it is reached (so new files there are covered too)."""
    needed = {p.relative_to(root).as_posix() for p in files(*names, root=root)}
    out: set[str] = set()
    for path in needed:
        folder = path.rpartition("/")[0]
        while folder:
            siblings = {p.relative_to(root).as_posix() for p in _sources(root / folder)}
            if not siblings <= needed:
                break
            path, folder = folder, folder.rpartition("/")[0]
        out.add(path)
    return sorted(p for p in out if not any(p.startswith(q + "/") for q in out if q != p))


CODE_PREFIXES = tuple(f"{pkg}/" for pkg in PACKAGES) + PACKAGES


def stage_module(cmd: str) -> str | None:
    """The repository module a DVC stage command runs (``python pipelines/x.py ...`` or
    ``python -m pkg.mod ...``), or None."""
    words = cmd.split()
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            return words[i + 1]
        if word.endswith(".py") and word.startswith(CODE_PREFIXES):
            return word.removesuffix(".py").replace("/", ".")
    return None


def rewrite_dvc_deps(text: str, root: Path = ROOT) -> str:
    """``dvc.yaml``'s text with each stage's code deps replaced by :func:`dvc_deps` of the
    module its command runs; other deps (data), comments and layout are kept."""
    import yaml

    stages = yaml.safe_load(text)["stages"]
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage = stripped[:-1]
        if stripped == "deps:" and stage in stages:
            out.append(line)
            indent = line[: len(line) - len(line.lstrip())] + "  "
            i += 1
            kept: list[str] = []
            while i < len(lines) and lines[i].startswith(indent + "- "):
                dep = lines[i].strip()[2:].strip()
                if not dep.startswith(CODE_PREFIXES):
                    kept.append(lines[i])
                i += 1
            module = stage_module(stages[stage]["cmd"])
            code = dvc_deps(module, root=root) if module else []
            out.extend(f"{indent}- {dep}\n" for dep in code)
            out.extend(kept)
            continue
        out.append(line)
        i += 1
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m mambastyle.codegraph [--check] [dvc.yaml]``: writes each stage's code deps
    from the import graph (``--check``: exits 1 and names the stages whose deps differ)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("dvc_yaml", nargs="?", default=str(ROOT / "dvc.yaml"))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.dvc_yaml)
    text = path.read_text()
    new = rewrite_dvc_deps(text, path.parent)
    if args.check:
        if new != text:
            print(f"{path}: code deps differ from the import graph; run `python -m mambastyle.codegraph`")
            return 1
        return 0
    if new != text:
        path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
