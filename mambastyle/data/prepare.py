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
import posixpath
import sys
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from mambastyle import __version__
from mambastyle.codegraph import source_hash
from mambastyle.data.executors import Executor, isolated, run_inputs
from mambastyle.data.faces import Outcome, PrepareConfig, input_sha256
from mambastyle.data.inputs import InputRef, ffhq_inputs, list_inputs
from mambastyle.data.shards import (
    SPLITS,
    Sample,
    ShardError,
    ShardWriter,
    build_manifest,
    commit,
    read_samples,
    sample_members,
    shard_path,
    tar_chunks,
    withdraw,
    write_shard,
)
from mambastyle.locks import writer_lock
from mambastyle.runstats import STATS_NAME, RunStats
from mambastyle.storage import Location, StorageOptions, exists, list_files, read_bytes, resolve, write_bytes

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
        h.update(f"\0{r.key}\0{r.uri}\0{r.version}\0{r.landmarks}\0{r.box}\0{r.error}".encode())
    return f"unit-{index:06d}-{h.hexdigest()[:16]}.tar"


def _save_unit(loc: Location, outcomes: list[Outcome]) -> None:
    index = [
        {"uri": o.uri, "reason": o.reason, "message": o.message, "sha256": o.sha256,
         "samples": [s.key for s in o.samples]}
        for o in outcomes
    ]  # fmt: skip
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
            outcomes.append(
                Outcome(entry["uri"], samples, entry["reason"], entry["message"], entry["sha256"])
            )
        return outcomes
    except (OSError, KeyError, ValueError, TypeError, AttributeError, tarfile.TarError):
        return None  # missing or unusable: the unit is recomputed


MODES = ("sync", "extend")


def prepare(
    refs: list[InputRef],
    out: Location,
    config: PrepareConfig,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor = "processes",
    stats: RunStats | None = None,
    mode: str = "sync",
) -> dict:
    """Runs the stage over ``refs`` and publishes shards, quarantine and manifest under ``out/shards``.

    Where the shards already hold a dataset made with the same settings and code, the run is
    incremental: only inputs whose key is new are processed, into new shards appended after
    the existing ones, which stay byte-identical. ``mode`` says what happens to inputs that
    left the source or were rewritten in place (listed with another version than the manifest
    records, see ``InputRef``, and bytes whose sha256 differs from the recorded one):
    ``sync`` removes the faces of both (what else a shard holding them held is written as a
    new shard, and the old one deleted) and processes the rewritten ones again; ``extend``
    only adds, keeping both as they were (and the recorded versions, so a later ``sync``
    still sees the rewrites). Otherwise every input is processed.

    Returns the manifest (also written, last, to ``out/shards/manifest.json``); the run's
    statistics go to ``stats`` (when given) and, after the commit, to ``out/shards/stats.json``.
    """
    if mode not in MODES:
        raise ValueError(f"prepare mode must be one of {MODES}, got {mode!r}")
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
    entries, quarantine, versions, digests = _base(shards_root, config)
    known = {k for e in entries for k in e["inputs"]} | {q["key"] for q in quarantine}
    relisted = [r for r in refs if r.key in known and None not in (r.version, versions.get(r.key))
                and r.version != versions[r.key]]  # fmt: skip
    if mode == "sync":
        rewritten = _rewritten(relisted, digests)
        removed = (known - set(keys)) | rewritten
        todo = [r for r in refs if r.key not in known or r.key in rewritten]
    else:
        rewritten, removed, todo = set(), set(), [r for r in refs if r.key not in known]
    stats.reused += len(refs) - len(todo)
    if known:
        new, left = sum(r.key not in known for r in refs), len(known - set(keys))
        changed = f"{len(rewritten)} rewritten" if mode == "sync" else f"{len(relisted)} listed anew (kept)"
        log.info("incremental (%s): %d new inputs, %s, %d left the source%s", mode, new, changed, left,
                 "" if mode == "sync" else " (kept)")  # fmt: skip
    # What the new manifest records of each input: sync records every version as listed now (a
    # relisted input whose bytes are unchanged is not read again next time); extend keeps the
    # recorded ones, so a later sync still compares against what was read.
    versions = {k: v for k, v in versions.items() if k not in removed}
    digests = {k: v for k, v in digests.items() if k not in removed}
    for r in refs:
        if r.version is not None and (mode == "sync" or r.key not in versions):
            versions[r.key] = r.version
    start = _next_index(entries)
    outcomes = _outcomes(todo, shards_root.join("_work"), config, workers, executor, progress, stats)
    if not known:
        # A full run writes shards at the paths a previous manifest may list: withdraw that
        # commit point first (readers trust only a manifest, so while shards are replaced there
        # is none). An incremental run writes new paths only, and the old manifest stays valid
        # until the new one replaces it: a run killed midway leaves the dataset as it was.
        withdraw(shards_root)
    with stats.phase("process_and_write"):
        entries = _without(shards_root, entries, removed, start)
        writer = ShardWriter(shards_root, config.shard_max_samples, config.shard_max_bytes, start)
        quarantine = [q for q in quarantine if q["key"] not in removed]
        for ref, outcome in zip(todo, outcomes, strict=True):
            if outcome.reason:
                record = {"source": outcome.uri, "key": ref.key, "reason": outcome.reason}
                quarantine.append(record | {"message": outcome.message})
                stats.quarantined[outcome.reason] = stats.quarantined.get(outcome.reason, 0) + 1
            if outcome.sha256 is not None:
                digests[ref.key] = outcome.sha256
            for sample in outcome.samples:
                writer.add(sample, ref.key)
        entries = sorted(entries + writer.close(), key=lambda e: (SPLITS.index(e["split"]), e["path"]))
    with stats.phase("commit"):
        inputs = len(known - removed) + len(todo)
        in_dataset = {k for e in entries for k in e["inputs"]} | {q["key"] for q in quarantine}
        manifest = build_manifest(
            dataclasses.asdict(config),
            config.params_hash(),
            __version__,
            inputs,
            quarantine,
            entries,
            {k: v for k, v in versions.items() if k in in_dataset},
            {k: v for k, v in digests.items() if k in in_dataset},
        )
        manifest["code_sha256"] = _code_hash()
        commit(shards_root, manifest, quarantine)
    stats.written = manifest["counts"]["written"]
    write_bytes(shards_root.join(STATS_NAME), stats.to_json(), durable=False)
    return manifest


def _base(shards_root: Location, config: PrepareConfig) -> tuple[list[dict], list[dict], dict, dict]:
    """The committed dataset an incremental run builds on: (its shard entries, its quarantine
    records, its inputs' recorded versions and sha256s), or nothing when there is none or it was
    made with other settings or code, lacks the per-shard input lists, or a shard it lists is
    missing or of another size."""
    try:
        manifest = json.loads(read_bytes(shards_root.join("manifest.json")))
    except (FileNotFoundError, ValueError):
        return [], [], {}, {}
    why = None
    if manifest.get("params_hash") != config.params_hash():
        why = "the prepare settings changed"
    elif manifest.get("code_sha256") != _code_hash():
        why = "the alignment code changed"
    else:
        sizes = {posixpath.relpath(p, shards_root.path): None for p in list_files(shards_root)}
        for entry in manifest.get("shards", []):
            if "inputs" not in entry or entry["path"] not in sizes:
                why = f"shard {entry['path']} is missing or has no input list"
                break
    quarantine = []
    if why is None:
        try:
            text = read_bytes(shards_root.join("quarantine.jsonl")).decode()
            quarantine = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (FileNotFoundError, ValueError):
            why = "its quarantine list is unreadable"
        if any("key" not in q for q in quarantine):
            why = "its quarantine list has no input keys"
    if why is not None:
        log.info("processing every input: %s since %s", why, shards_root.join("manifest.json").uri)
        return [], [], {}, {}
    recorded = [manifest.get(name) for name in ("input_versions", "input_sha256")]
    versions, digests = (
        {str(k): str(v) for k, v in m.items()} if isinstance(m, dict) else {} for m in recorded
    )
    if not versions:
        log.info("%s records no input versions: inputs are taken as unchanged, their versions recorded now",
                 shards_root.join("manifest.json").uri)  # fmt: skip
    return list(manifest["shards"]), quarantine, versions, digests


def _rewritten(relisted: list[InputRef], digests: dict[str, str]) -> set[str]:
    """The keys of ``relisted`` (inputs listed with another version than recorded) whose bytes
    are not the ones recorded: each read and hashed, a few at a time (a touched or copied file
    is no rewrite). One without a recorded sha256 or that cannot be read counts as rewritten:
    processing it again records what it is now, or quarantines it with the reason."""

    def differs(ref: InputRef) -> bool:
        if ref.key not in digests:
            return True
        try:
            return input_sha256(ref.read()) != digests[ref.key]
        except OSError:
            return True

    if not relisted:
        return set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        return {r.key for r, differ in zip(relisted, pool.map(differs, relisted), strict=True) if differ}


def _next_index(entries: list[dict]) -> dict[str, int]:
    """Per split, the index after the highest shard index in ``entries``."""
    nxt: dict[str, int] = {}
    for e in entries:
        index = int(posixpath.basename(e["path"]).removesuffix(".tar").rsplit("-", 1)[1])
        nxt[e["split"]] = max(nxt.get(e["split"], 0), index + 1)
    return nxt


def _without(
    shards_root: Location, entries: list[dict], removed: set[str], start: dict[str, int]
) -> list[dict]:
    """``entries`` with the faces of the ``removed`` inputs taken out: the rest of a shard that
    held some is written as a new shard (the next index of its split, counted in ``start``),
    so no listed shard changes before the commit; the commit deletes the old files. The other
    entries stay as they are."""
    if not removed:
        return entries
    kept = []
    for entry in entries:
        gone = removed.intersection(entry["inputs"])
        if not gone:
            kept.append(entry)
            continue
        inputs = set(entry["inputs"])
        samples = read_samples(shards_root.join(entry["path"]))
        samples = [s for s in samples if _input_of(s.key, inputs) not in gone]
        if samples:
            split = entry["split"]
            path = shard_path(split, start.get(split, 0))
            start[split] = start.get(split, 0) + 1
            size, sha256 = write_shard(shards_root.join(path), samples)
            kept.append({**entry, "path": path, "samples": len(samples), "bytes": size, "sha256": sha256,
                         "inputs": sorted(inputs - gone)})  # fmt: skip
    return kept


def _input_of(sample_key: str, inputs: set[str]) -> str:
    """Which of a shard's ``inputs`` a sample key comes from (``multi_face: each`` adds ``_f{i}``)."""
    if sample_key in inputs:
        return sample_key
    base, _, index = sample_key.rpartition("_f")
    if base in inputs and index.isdigit():
        return base
    raise ShardError(f"sample {sample_key!r} comes from none of its shard's listed inputs")


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
    mode: str = "sync",
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
                           progress=lambda done, total: bar.update(done - bar.n), stats=stats,
                           mode=mode)  # fmt: skip
    counts = manifest["counts"]
    if counts["written"] == 0:  # shards without a face are no use to any later stage
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counts["quarantine_reasons"].items()))
        raise ValueError(
            f"no face written: {counts['inputs']} inputs, {counts['quarantined']} quarantined ({reasons}); "
            f"each input's reason is in {out.join('shards', 'quarantine.jsonl').uri}"
        )
    return manifest, out
