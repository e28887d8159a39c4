"""The import graph behind DVC deps and code hashes, on a small repository made for the test."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from mambastyle import codegraph


def _repo(tmp_path, files: dict[str, str]):
    for rel, body in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    return tmp_path


FILES = {
    "mambastyle/__init__.py": "",
    "mambastyle/a.py": "import os\nfrom mambastyle import b\n",
    "mambastyle/b.py": "def f():\n    from .sub.c import g  # lazy and relative\n    return g\n",
    "mambastyle/sub/__init__.py": "",
    "mambastyle/sub/c.py": "import ray\n",
    "mambastyle/sub/d.py": "from ..a import os\n",
    "mambastyle/unrelated.py": "",
    "pipelines/stage.py": "from mambastyle.a import os\n",
    "pipelines/other.py": "",
}


def test_closure_follows_lazy_relative_and_package_imports(tmp_path):
    root = _repo(tmp_path, FILES)
    assert codegraph.closure("pipelines.stage", root=root) == [
        "mambastyle", "mambastyle.a", "mambastyle.b", "mambastyle.sub", "mambastyle.sub.c", "pipelines.stage",
    ]  # fmt: skip
    assert codegraph.external("mambastyle.sub.c", root=root) == {"ray"}
    assert codegraph.cycles(codegraph.graph(root)) == []


def test_a_cycle_is_found_even_through_a_lazy_import(tmp_path):
    root = _repo(tmp_path, {**FILES, "mambastyle/sub/c.py": "def h():\n    import mambastyle.a\n"})
    assert codegraph.cycles(codegraph.graph(root)) == [["mambastyle.a", "mambastyle.b", "mambastyle.sub.c"]]


def test_source_hash_changes_with_any_reached_file_only(tmp_path):
    root = _repo(tmp_path, FILES)
    before = codegraph.source_hash("mambastyle.a", root=root)
    (root / "mambastyle/unrelated.py").write_text("x = 1\n")
    assert codegraph.source_hash("mambastyle.a", root=root) == before
    codegraph._direct.cache_clear()
    codegraph._imported_names.cache_clear()
    (root / "mambastyle/sub/c.py").write_text("import ray  # changed\n")
    assert codegraph.source_hash("mambastyle.a", root=root) != before
    assert codegraph.source_hash("mambastyle.a", salt="other", root=root) != before


def test_dvc_deps_name_whole_folders_only_when_every_module_is_reached(tmp_path):
    root = _repo(tmp_path, FILES)
    # sub/d.py is not reached, so the folder is not named whole
    assert codegraph.dvc_deps("pipelines.stage", root=root) == [
        "mambastyle/__init__.py", "mambastyle/a.py", "mambastyle/b.py", "mambastyle/sub/__init__.py",
        "mambastyle/sub/c.py", "pipelines/stage.py",
    ]  # fmt: skip
    (root / "pipelines/stage.py").write_text("from mambastyle.a import os\nfrom mambastyle.sub import d\n")
    codegraph._direct.cache_clear()
    codegraph._imported_names.cache_clear()
    assert "mambastyle/sub" in codegraph.dvc_deps("pipelines.stage", root=root)


def test_dvc_yaml_code_deps_are_rewritten_and_the_rest_kept(tmp_path):
    root = _repo(tmp_path, FILES)
    text = textwrap.dedent(
        """\
        # a comment that stays
        stages:
          one:
            cmd: python pipelines/stage.py --out data/one
            deps:
              - mambastyle/a.py
              - data/input.json
            params:
              - one  # this one too
        """
    )
    new = codegraph.rewrite_dvc_deps(text, root)
    assert new.splitlines()[0] == "# a comment that stays" and "      - one  # this one too" in new
    deps = new.split("deps:\n")[1].split("    params:")[0].split()
    want = [*codegraph.dvc_deps("pipelines.stage", root=root), "data/input.json"]
    assert [d for d in deps if d != "-"] == want
    assert codegraph.rewrite_dvc_deps(new, root) == new


def test_the_repository_dvc_yaml_lists_every_file_each_stage_imports(repo):
    # A stage whose deps miss a file it imports would be reused by `dvc repro` after that file
    # changed; the deps are written from the graph (`python -m mambastyle.codegraph`).
    done = subprocess.run([sys.executable, "-m", "mambastyle.codegraph", "--check", str(repo / "dvc.yaml")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_code_hashes_cover_what_their_code_imports(tmp_path):
    # prepare's saved work is keyed by the per-input code and what it imports (the pixel
    # kernels included); a training run's id by its workers' closure
    import shutil

    import mambastyle
    from mambastyle.data import prepare
    from mambastyle.runs import TRAINING_CODE, code_hash

    faces = {p.relative_to(codegraph.ROOT).as_posix() for p in codegraph.files("mambastyle.data.faces")}
    assert {"mambastyle/data/_resample.py", "mambastyle/data/_png.py", "mambastyle/data/align.py"} <= faces
    assert prepare._code_hash() == codegraph.source_hash("mambastyle.data.faces", salt=mambastyle.__version__)
    trained = {p.relative_to(codegraph.ROOT).as_posix() for p in codegraph.files(TRAINING_CODE)}
    assert {
        "mambastyle/train/loop.py",
        "mambastyle/models/encoders.py",
        "mambastyle/layers/ss2d.py",
    } <= trained
    assert code_hash() == codegraph.source_hash(TRAINING_CODE, salt=mambastyle.__version__)
    # and the hash moves when one of those files changes, in a copy of the package
    shutil.copytree(
        codegraph.ROOT / "mambastyle", tmp_path / "mambastyle", ignore=shutil.ignore_patterns("__pycache__")
    )
    before = codegraph.source_hash("mambastyle.data.faces", root=tmp_path)
    with open(tmp_path / "mambastyle/data/_png.py", "a") as f:
        f.write("\n# changed\n")
    assert codegraph.source_hash("mambastyle.data.faces", root=tmp_path) != before
