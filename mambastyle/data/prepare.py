"""The prepare stage's core: photos -> aligned faces -> WebDataset shards + manifest + quarantine.

Inputs come from ``inputs``, each is processed by ``faces.process_input`` where ``executors``
says, and the results are framed into shards and committed by ``shards`` (the format and its
contracts). Keys are stable (derived from the source path) and the split is a stable hash of
the key, so a re-run produces byte-identical shards and manifest. inputs = written +
quarantined, always. Finished work is saved in units so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import sys
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool

from mambastyle import __version__
from mambastyle.codegraph import source_hash
from mambastyle.data.executors import Executor, isolated, run_inputs
from mambastyle.data.faces import Outcome, PrepareConfig
from mambastyle.data.inputs import InputRef, ffhq_inputs, list_inputs
from mambastyle.data.shards import (
    Sample,
    ShardWriter,
    build_manifest,
    commit,
    sample_members,
    tar_chunks,
    withdraw,
)
from mambastyle.locks import writer_lock
from mambastyle.runstats import STATS_NAME, RunStats
from mambastyle.storage import Location, StorageOptions, exists, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)


def inputs_from_source(source: str, options: StorageOptions | None = None) -> list[InputRef]:
    """``demo`` (the embedded demo set), an FFHQ metadata ``.json``, a local folder, or an
    S3 prefix -> inputs."""
    if source == "demo":
        from mambastyle.data.demo import demo_inputs

        return demo_inputs()
    if source.endswith(".json"):
        return ffhq_inputs(resolve(source, options))
    return list_inputs(resolve(source, options))


# --------------------------------------------------------------------------- resumable work
#
# Outcomes are saved in units of UNIT_INPUTS inputs under shards/_work/ while the stage runs,
# so a re-run after an interruption reloads finished units instead of recomputing them. A
# unit's file name carries a hash of the params and of its inputs' keys and URIs. The work
# files are removed once the manifest is committed.

UNIT_INPUTS = 64


@functools.cache
def _code_hash() -> str:
    """Hash of the code that computes outcomes (the per-input work and everything it imports),
    so saved work from other code is not reused."""
    return source_hash("mambastyle.data.faces", salt=__version__)


def _unit_name(index: int, refs: list[InputRef], config: PrepareConfig) -> str:
    h = hashlib.sha256(config.params_hash().encode())
    h.update(_code_hash().encode())
    for r in refs:
        h.update(f"\0{r.key}\0{r.uri}\0{r.landmarks}\0{r.box}\0{r.error}".encode())
    return f"unit-{index:06d}-{h.hexdigest()[:16]}.tar"


def _save_unit(loc: Location, outcomes: list[Outcome]) -> None:
    index = [
        {"uri": o.uri, "reason": o.reason, "message": o.message, "samples": [s.key for s in o.samples]}
        for o in outcomes
    ]
    samples = [s for o in outcomes for s in o.samples]
    write_bytes(loc, tar_chunks([("_outcomes.json", json.dumps(index).encode()), *sample_members(samples)]))


def _load_unit(loc: Location) -> list[Outcome] | None:
    """The outcomes saved in a unit file, or None when it is missing or unreadable."""
    try:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(loc))) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        outcomes = []
        for entry in json.loads(files["_outcomes.json"]):
            samples = []
            for key in entry["samples"]:
                meta_json = files[f"{key}.json"]
                samples.append(Sample(key, json.loads(meta_json)["split"], files[f"{key}.png"], meta_json))
            outcomes.append(Outcome(entry["uri"], samples, entry["reason"], entry["message"]))
        return outcomes
    except (OSError, KeyError, ValueError, TypeError, AttributeError, tarfile.TarError):
        return None  # missing or unusable: the unit is recomputed


def prepare(
    refs: list[InputRef],
    out: Location,
    config: PrepareConfig,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor = "processes",
    stats: RunStats | None = None,
) -> dict:
    """Runs the stage over ``refs`` and publishes shards, quarantine and manifest under ``out/shards``.

    Returns the manifest (also written, last, to ``out/shards/manifest.json``); the run's
    statistics go to ``stats`` (when given) and, after the commit, to ``out/shards/stats.json``.
    """
    stats = stats or RunStats("prepare")
    stats.inputs = len(refs)
    keys = [r.key for r in refs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"input keys collide: {dupes}")
    # Inputs run in key order, which is also the order of samples within a split's shards,
    # so shards are written as soon as they fill and only one per split is held in memory.
    refs = sorted(refs, key=lambda r: r.key)
    shards_root = out.join("shards")
    writer = ShardWriter(shards_root, config.shard_max_samples, config.shard_max_bytes)
    quarantine: list[dict] = []
    outcomes = _outcomes(refs, shards_root.join("_work"), config, workers, executor, progress, stats)
    # Withdraw the previous commit point before touching any shard it lists: readers trust
    # only a manifest, so while shards are being replaced there is none.
    withdraw(shards_root)
    with stats.phase("process_and_write"):
        for outcome in outcomes:
            if outcome.reason:
                quarantine.append(
                    {"source": outcome.uri, "reason": outcome.reason, "message": outcome.message}
                )
                stats.quarantined[outcome.reason] = stats.quarantined.get(outcome.reason, 0) + 1
            for sample in outcome.samples:
                writer.add(sample)
        entries = writer.close()
    with stats.phase("commit"):
        manifest = build_manifest(
            dataclasses.asdict(config), config.params_hash(), __version__, len(refs), quarantine, entries
        )
        commit(shards_root, manifest, quarantine)
    stats.written = manifest["counts"]["written"]
    write_bytes(shards_root.join(STATS_NAME), stats.to_json(), durable=False)
    return manifest


def _outcomes(
    refs: list[InputRef],
    work: Location,
    config: PrepareConfig,
    workers: int,
    executor: Executor,
    progress: Callable[[int, int], None] | None,
    stats: RunStats,
) -> Iterator[Outcome]:
    """Every input's outcome in order: from a saved unit where one describes exactly these
    inputs, else computed (and the unit saved)."""
    units = [refs[i : i + UNIT_INPUTS] for i in range(0, len(refs), UNIT_INPUTS)]
    unit_locs = [work.join(_unit_name(i, unit, config)) for i, unit in enumerate(units)]
    saved = [exists(loc) for loc in unit_locs]
    todo = [r for unit, is_saved in zip(units, saved, strict=True) if not is_saved for r in unit]
    if len(todo) < len(refs):
        log.info("resuming: %d of %d inputs saved in %s", len(refs) - len(todo), len(refs), work.uri)
    fresh = run_inputs(todo, config, workers, executor)
    done = 0
    for unit, loc, is_saved in zip(units, unit_locs, saved, strict=True):
        outcomes = _load_unit(loc) if is_saved else None
        if outcomes is not None and [o.uri for o in outcomes] != [r.uri for r in unit]:
            outcomes = None  # a unit file that does not describe exactly these inputs
        if outcomes is None:
            if is_saved:  # saved but unusable: recompute this unit on its own
                outcomes = list(run_inputs(unit, config, workers, executor))
            else:
                outcomes = []
                for _ in unit:
                    try:
                        outcomes.append(next(fresh))
                    except BrokenProcessPool:
                        # A worker died (crash, out of memory) and took the pool with it. Run
                        # the rest of this unit one input per process to find the culprit, then
                        # restart the pool for the inputs after this unit.
                        outcomes.extend(isolated(r, config) for r in unit[len(outcomes) :])
                        later = [r for r in todo if r.key > unit[-1].key]
                        fresh = run_inputs(later, config, workers, executor)
                        break
                    if progress:
                        progress(done + len(outcomes), len(refs))
            _save_unit(loc, outcomes)
            stats.computed += len(unit)
        else:
            stats.reused += len(unit)
        yield from outcomes
        done += len(unit)
        if progress:
            progress(done, len(refs))


def run_from_source(
    source: str,
    root: str,
    config: PrepareConfig,
    options: StorageOptions | None = None,
    workers: int = 1,
    executor: Executor = "processes",
    ray_address: str | None = None,
    ray_cpus: int | None = None,
) -> tuple[dict, Location]:
    """The whole stage from a source URI to shards under ``root``, with a progress bar on stderr.

    For ``executor='ray'`` it first connects to Ray (``ray_address``: None = a local
    instance). Returns (manifest, the resolved root); the run's statistics are in
    ``shards/stats.json`` beside the manifest. Raises ValueError when no face was written (the
    manifest, quarantine list and statistics are committed first, for inspection).
    """
    from tqdm import tqdm

    stats = RunStats("prepare")
    with stats.phase("list"):
        refs = inputs_from_source(source, options)
    out = resolve(root, options)
    if executor == "ray":
        from mambastyle.runtime import connect_ray

        connect_ray(ray_address, ray_cpus)
    with (
        writer_lock(root, options, "prepare"),
        tqdm(total=len(refs), desc="prepare", unit="img", file=sys.stderr, disable=None) as bar,
    ):
        manifest = prepare(refs, out, config, workers=workers, executor=executor,
                           progress=lambda done, total: bar.update(done - bar.n), stats=stats)  # fmt: skip
    counts = manifest["counts"]
    if counts["written"] == 0:  # shards without a face are no use to any later stage
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counts["quarantine_reasons"].items()))
        raise ValueError(
            f"no face written: {counts['inputs']} inputs, {counts['quarantined']} quarantined ({reasons}); "
            f"each input's reason is in {out.join('shards', 'quarantine.jsonl').uri}"
        )
    return manifest, out
