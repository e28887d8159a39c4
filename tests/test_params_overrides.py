"""``dvc exp run -S key=value`` rewrites params.yaml through DVC's own override code (Hydra's
parser, then a ruamel round trip). The shipped files are laid out as that round trip writes
them, so an override changes the value it names and nothing else: layout, nulls, lists and
comments are kept."""

from __future__ import annotations

import difflib
import shutil

import pytest
import yaml

pytest.importorskip("dvc")
pytest.importorskip("hydra")

FILES = ("params.yaml", "profiles/ffhq.yaml")


def _leaves(node, prefix=()):
    """(dotted path, value) of every scalar outside a list (what ``-S a.b.c=v`` can name)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*prefix, key))
    elif not isinstance(node, list):
        yield ".".join(prefix), node


def _other(value) -> str:
    """A different value of the same kind, written as a Hydra override value."""
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, float):
        return repr(value * 2 + 1)
    if value is None:
        return "3"
    return f'"{value}x"'


def _apply(path, override: str) -> None:
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(path), [override])


@pytest.mark.parametrize("name", FILES)
def test_every_override_changes_only_its_own_line(repo, tmp_path, name):
    original = (repo / name).read_text()
    data = yaml.safe_load(original)
    leaves = list(_leaves(data))
    assert len(leaves) > 50
    work = tmp_path / "params.yaml"
    for dotted, value in leaves:
        shutil.copy(repo / name, work)
        _apply(work, f"{dotted}={_other(value)}")
        after = work.read_text()
        changed = [line for line in difflib.ndiff(original.splitlines(), after.splitlines())
                   if line.startswith(("- ", "+ "))]  # fmt: skip
        leaf = dotted.rsplit(".", 1)[-1]
        assert len(changed) == 2 and all(line[2:].lstrip().startswith(f"{leaf}:") for line in changed), (
            f"{name}: -S {dotted} changed more than its line:\n" + "\n".join(changed)
        )
        # the rest of the file parses to the same values
        new = yaml.safe_load(after)
        node_new, node_old = new, data
        *parents, key = dotted.split(".")
        for part in parents:
            node_new, node_old = node_new[part], node_old[part]
        node_new[key] = node_old[key]
        assert new == data


def test_a_list_override_changes_only_the_list(repo, tmp_path):
    work = tmp_path / "params.yaml"
    shutil.copy(repo / "params.yaml", work)
    _apply(work, "evaluate.editability.strengths=[-1.0,1.0]")
    before, after = (repo / "params.yaml").read_text().splitlines(), work.read_text().splitlines()
    changed = [line for line in difflib.ndiff(before, after) if line.startswith(("- ", "+ "))]
    assert changed == ["-     - -2.0", "-     - 2.0"]


def test_the_file_is_a_fixed_point_of_the_round_trip(repo, tmp_path):
    """Setting a value to what it already is leaves the file byte for byte as it was."""
    for name in FILES:
        work = tmp_path / "params.yaml"
        shutil.copy(repo / name, work)
        seed = yaml.safe_load((repo / name).read_text())["generator"]["init_seed"]
        _apply(work, f"generator.init_seed={seed}")
        assert work.read_text() == (repo / name).read_text(), f"{name} is not in the round trip's layout"
