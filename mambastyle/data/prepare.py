"""The prepare stage's core: photos -> aligned faces -> WebDataset shards + manifest + quarantine.

Contracts (see DESIGN.md): shards ``{root}/shards/{split}/{split}-{index:06d}.tar`` whose
samples are ``{key}.png`` + ``{key}.json`` (adjacent); ``{root}/shards/quarantine.jsonl``
with one line per rejected input; ``{root}/shards/manifest.json`` written last (the
commit point). Keys are stable (derived from the source path), the split is a stable
hash of the key, and tar members carry fixed metadata, so a re-run produces
byte-identical shards and manifest. inputs = written + quarantined, always.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import posixpath
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from mambastyle import __version__
from mambastyle.data.align import AlignmentUnavailable, Face, align_face, detect_faces, estimate_pose
from mambastyle.data.images import InputRejected, decode_image, encode_png
from mambastyle.storage import (
    Location,
    StorageOptions,
    delete,
    exists,
    list_files,
    read_bytes,
    resolve,
    write_bytes,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that determines the stage's output (hashed into the manifest)."""

    output_size: int = 256
    multi_face: Literal["largest", "each", "reject"] = "largest"
    min_face_size: int = 32
    min_score: float = 0.5  # HOG detector score; false positives on face-like patterns score lower
    upsample: int = 0
    max_pixels: int = 64_000_000
    shard_max_samples: int = 1000
    shard_max_bytes: int = 1 << 30
    # deflate level (0-9) of the aligned PNGs: 1 is ~13x faster than 6, files ~7% larger
    png_compress_level: int = 1
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def params_hash(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class InputRef:
    """One input: a stable key, the URI it is reported under, and where its bytes are
    (an object in storage, or bytes held in memory). Picklable, for worker processes."""

    key: str
    uri: str
    loc: Location | None = field(default=None, repr=False)
    data: bytes | None = field(default=None, repr=False)
    # Known face (e.g. from FFHQ's metadata): (68, 2) landmarks and the face box; the
    # detector is skipped for such inputs.
    landmarks: tuple[tuple[float, float], ...] | None = field(default=None, repr=False)
    box: tuple[int, int, int, int] | None = None
    extra: tuple[tuple[str, str], ...] = ()  # more provenance for the sample's JSON
    error: tuple[str, str] | None = None  # (reason, message): known bad before reading

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.loc is None:
            raise ValueError(f"input {self.uri} has neither a location nor data")
        return read_bytes(self.loc)


@dataclass
class Sample:
    """One aligned face. Its metadata travels as the JSON bytes of the shard member, encoded
    once where the sample is made (in the worker), so that shard writing only frames bytes."""

    key: str
    split: str
    png: bytes
    meta_json: bytes

    @classmethod
    def of(cls, key: str, split: str, png: bytes, meta: dict) -> Sample:
        return cls(key, split, png, json.dumps(meta, sort_keys=True).encode())

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)


@dataclass
class Outcome:
    """What became of one input: its samples, or the reason it was quarantined."""

    uri: str
    samples: list[Sample] = field(default_factory=list)
    reason: str | None = None
    message: str | None = None


# --------------------------------------------------------------------------- keys, splits


def make_key(relative: str) -> str:
    """A stable key without dots: a readable slug of the path plus a short hash of it."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", relative).strip("_")[-48:] or "input"
    return f"{slug}_{hashlib.sha256(relative.encode()).hexdigest()[:10]}"


def split_of(key: str, fractions: tuple[float, float, float]) -> str:
    """train/val/test by a stable hash of the key."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def list_inputs(source: Location) -> list[InputRef]:
    """Every file below ``source`` (recursive, sorted): a folder or an S3 prefix."""
    files = list_files(source)
    if not files:
        raise FileNotFoundError(f"no input files under {source.uri}")
    base = source.path.rstrip("/") + "/"
    refs = []
    for path in files:
        rel = path[len(base) :] if path.startswith(base) else path.rsplit("/", 1)[-1]
        uri = source.uri.rstrip("/") + "/" + rel if path != source.path else source.uri
        refs.append(InputRef(make_key(rel), uri, loc=Location(source.fs, path, uri)))
    return refs


def ffhq_inputs(metadata: Location) -> list[InputRef]:
    """Inputs from FFHQ's metadata JSON (``ffhq-dataset-v2.json``): each entry's in-the-wild
    image (``in_the_wild.file_path``, relative to the JSON's folder) with its 68 landmarks
    and face box, so no detector runs. Entries without in-the-wild data are skipped."""
    entries = json.loads(read_bytes(metadata))
    if not isinstance(entries, dict):
        raise ValueError(f"{metadata.uri}: expected FFHQ metadata (an object keyed by image index)")
    base = posixpath.dirname(metadata.path)
    base_uri = metadata.uri.rsplit("/", 1)[0]
    refs = []
    for index in sorted(entries, key=lambda k: (len(k), k)):
        wild = entries[index].get("in_the_wild") if isinstance(entries[index], dict) else None
        if not wild:
            continue
        extra = (("ffhq_index", str(index)), ("ffhq_category", str(entries[index].get("category", ""))))
        try:
            rel = str(wild["file_path"])
            landmarks = tuple((float(x), float(y)) for x, y in wild["face_landmarks"])
            box = tuple(int(round(float(v))) for v in wild["face_rect"]) if wild.get("face_rect") else None
            if len(landmarks) != 68:
                raise ValueError(f"expected 68 landmarks, got {len(landmarks)}")
        except (KeyError, TypeError, ValueError) as exc:
            # A malformed record is an input that cannot be used: quarantined, not fatal.
            uri = f"{metadata.uri}#{index}"
            error = ("bad_metadata", f"malformed in_the_wild record: {exc}")
            refs.append(InputRef(f"ffhq_{index}", uri, extra=extra, error=error))
            continue
        loc = Location(metadata.fs, posixpath.join(base, rel), f"{base_uri}/{rel}")
        refs.append(InputRef(f"ffhq_{index}", loc.uri, loc=loc, landmarks=landmarks, box=box, extra=extra))
    if not refs:
        raise FileNotFoundError(f"{metadata.uri}: no entries with in-the-wild images")
    return refs


def inputs_from_source(source: str, options: StorageOptions | None = None) -> list[InputRef]:
    """``demo`` (the embedded demo set), an FFHQ metadata ``.json``, a local folder, or an
    S3 prefix -> inputs."""
    if source == "demo":
        from mambastyle.data.demo import demo_inputs

        return demo_inputs()
    if source.endswith(".json"):
        return ffhq_inputs(resolve(source, options))
    return list_inputs(resolve(source, options))


# --------------------------------------------------------------------------- per input


def process_input(ref: InputRef, config: PrepareConfig) -> Outcome:
    """Decode, detect, align one input. Never raises for bad data: failures are outcomes."""
    try:
        if ref.error is not None:
            raise InputRejected(*ref.error)
        try:
            data = ref.read()
        except FileNotFoundError as exc:
            raise InputRejected("missing", str(exc)) from None
        img, original_size = decode_image(data, config.max_pixels)
        pixels = np.asarray(img)  # one copy, shared by detection and alignment
        if ref.landmarks is not None:  # a known face: no detection
            lm = np.asarray(ref.landmarks, dtype=np.float64)
            lo, hi = lm.min(0), lm.max(0)
            box = ref.box or (int(lo[0]), int(lo[1]), int(np.ceil(hi[0])), int(np.ceil(hi[1])))
            faces = [Face(box, float("nan"), lm)]
        else:
            found = detect_faces(pixels, upsample=config.upsample)
            faces = [f for f in found if f.score >= config.min_score]
        if not faces:
            raise InputRejected("no_face", f"no face detected with score >= {config.min_score}")
        big = [f for f in faces if f.size >= config.min_face_size]
        if not big:
            raise InputRejected("too_small", f"largest face {faces[0].size:.0f}px < {config.min_face_size}px")
        if config.multi_face == "reject" and len(big) > 1:
            raise InputRejected("multiple_faces", f"{len(big)} faces and the policy is 'reject'")
        chosen = big if config.multi_face == "each" else big[:1]
        samples = []
        for i, face in enumerate(chosen):
            key = ref.key if config.multi_face != "each" else f"{ref.key}_f{i}"
            split = split_of(ref.key, config.split)  # all faces of a photo in one split
            aligned, quad = align_face(pixels, face.landmarks, config.output_size)
            png = encode_png(np.asarray(aligned), config.png_compress_level)
            yaw, pitch, roll = estimate_pose(face.landmarks)
            meta = {
                "key": key,
                "source": ref.uri,
                "face_index": i,
                "faces_found": len(faces),
                "original_size": list(original_size),
                "oriented_size": list(img.size),
                "landmarks": np.round(face.landmarks, 2).tolist(),
                "quad": np.round(quad, 3).tolist(),
                "box": list(face.box),
                "detector_score": None if math.isnan(face.score) else round(face.score, 5),
                "yaw": round(yaw, 3),
                "pitch": round(pitch, 3),
                "roll": round(roll, 3),
                "split": split,
                "size": config.output_size,
                **dict(ref.extra),
            }
            samples.append(Sample.of(key, split, png, meta))
        return Outcome(ref.uri, samples)
    except InputRejected as exc:
        return Outcome(ref.uri, reason=exc.reason, message=exc.message)
    except (AlignmentUnavailable, MemoryError, OSError):
        # The environment, not the input: storage errors that outlived the client's retries,
        # a missing model, memory. Quarantining would drop inputs silently; stop instead.
        raise
    except Exception as exc:  # an unexpected failure on one input must not stop the batch
        log.exception("unexpected error on %s", ref.uri)
        return Outcome(ref.uri, reason="internal_error", message=f"{type(exc).__name__}: {exc}")


def _process_star(args):
    return process_input(*args)


def _crashed(ref: InputRef) -> Outcome:
    return Outcome(
        ref.uri,
        reason="worker_crash",
        message="the worker process died on this input (crash or out of memory)",
    )


def _isolated(ref: InputRef, config: PrepareConfig) -> Outcome:
    """Runs one input in a process of its own, so that a crash is pinned on that input."""
    with ProcessPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(_process_star, (ref, config)).result()
        except BrokenProcessPool:
            return _crashed(ref)


Executor = Literal["processes", "ray"]


def run_inputs(
    refs: list[InputRef], config: PrepareConfig, workers: int = 1, executor: Executor = "processes"
) -> Iterator[Outcome]:
    """Outcomes in input order.

    ``processes``: ``workers`` local processes (1 = in this process). ``ray``: one Ray task
    per input on the cluster the caller has connected to (``ray.init``), two per cluster
    CPU in flight; inputs must be readable from every node (S3, shared storage, or
    in-memory bytes). Failed tasks (a lost node) are retried by Ray.
    """
    if executor == "ray":
        yield from _run_inputs_ray(refs, config)
        return
    if workers <= 1:
        for ref in refs:
            yield process_input(ref, config)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_process_star, [(r, config) for r in refs], chunksize=4)


def _run_inputs_ray(refs: list[InputRef], config: PrepareConfig) -> Iterator[Outcome]:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("executor 'ray' needs a connected Ray (ray.init) first")
    task = ray.remote(num_cpus=1, max_retries=3)(process_input)
    config_ref = ray.put(config)
    in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[int, object] = {}
    next_submit = 0
    for i in range(len(refs)):
        # Keep a bounded window of tasks running; results are yielded in input order.
        while next_submit < len(refs) and next_submit < i + in_flight:
            pending[next_submit] = task.remote(refs[next_submit], config_ref)
            next_submit += 1
        try:
            yield ray.get(pending.pop(i))
        except ray.exceptions.WorkerCrashedError:  # still dying after Ray's retries
            yield _crashed(refs[i])


# --------------------------------------------------------------------------- shards


def _tar_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for a member with fixed metadata (mtime 0, mode
    644, no owner), formatted directly for names of up to 100 bytes (tarfile's own ``tobuf``
    for longer ones, which it splits into a prefix or refuses)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(_USTAR_TEMPLATE)
    header[: len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[148:155] = b"%06o\0" % sum(header)  # checksum: the header with 8 spaces in its field
    return bytes(header)


# mode 644, uid/gid 0, mtime 0, checksum field blank, regular file, "ustar\0" "00", the rest NUL
_USTAR_TEMPLATE = bytes(
    bytearray(100) + b"0000644\0" + b"0000000\0" * 2 + bytearray(12) + b"00000000000\0" + b" " * 8
    + b"0" + bytearray(100) + b"ustar\x0000" + bytearray(512 - 265)
)  # fmt: skip


def tar_chunks(members: Iterable[tuple[str, bytes]]) -> list[bytes]:
    """The tar archive ``tarfile`` writes for these members (USTAR, fixed member metadata), as
    the list of its pieces: each member's header, its bytes and NUL padding to a 512-byte
    block, then two NUL blocks and padding to a whole 10240-byte record."""
    chunks: list[bytes] = []
    for name, data in members:
        chunks += (_tar_header(name, len(data)), data, bytes(-len(data) % tarfile.BLOCKSIZE))
    size = sum(map(len, chunks)) + 2 * tarfile.BLOCKSIZE
    chunks.append(bytes(2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE))
    return chunks


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    return b"".join(tar_chunks(members))


def _sample_members(samples: Iterable[Sample]) -> Iterator[tuple[str, bytes]]:
    for s in samples:
        yield f"{s.key}.png", s.png
        yield f"{s.key}.json", s.meta_json


def build_shard(samples: Iterable[Sample]) -> bytes:
    """A deterministic tar: per sample ``{key}.png`` then ``{key}.json``, fixed member metadata."""
    return tar_bytes(_sample_members(samples))


def write_shard(loc: Location, samples: Iterable[Sample], durable: bool = True) -> tuple[int, str]:
    """Writes the :func:`build_shard` tar of ``samples`` at ``loc`` (atomically, from its
    pieces, never joined in memory); returns its size and sha256."""
    pieces = tar_chunks(_sample_members(samples))
    # sha256 runs at about the speed of a write into the page cache, so it runs in a second
    # thread while the pieces are written (hashlib and file writes release the GIL).
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(_sha256, pieces)
        write_bytes(loc, pieces, durable=durable)
        return sum(map(len, pieces)), digest.result()


def _sha256(pieces: list[bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


# --------------------------------------------------------------------------- resumable work
#
# Outcomes are saved in units of UNIT_INPUTS inputs under shards/_work/ while the stage runs,
# so a re-run after an interruption reloads finished units instead of recomputing them. A
# unit's file name carries a hash of the params and of its inputs' keys and URIs. The work
# files are removed once the manifest is committed.

UNIT_INPUTS = 64


@functools.cache
def _code_hash() -> str:
    """Hash of the code that computes outcomes, so saved work from other code is not reused."""
    from mambastyle.data import align, images

    h = hashlib.sha256(__version__.encode())
    for module in (align, images, sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


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
    write_bytes(loc, tar_chunks([("_outcomes.json", json.dumps(index).encode()), *_sample_members(samples)]))


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


class _ShardWriter:
    """Packs samples into ``{split}/{split}-{index:06d}.tar`` shards as they arrive (in order),
    publishing each shard when the next sample would exceed its sample or byte limit."""

    def __init__(self, shards_root: Location, config: PrepareConfig):
        self.root, self.config = shards_root, config
        self.pending: dict[str, list[Sample]] = {split: [] for split in SPLITS}
        self.size: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self.index: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self.entries: list[dict] = []

    def add(self, sample: Sample) -> None:
        split, nbytes = sample.split, len(sample.png) + 2048  # png + json + tar headers, roughly
        full = len(self.pending[split]) >= self.config.shard_max_samples
        if self.pending[split] and (full or self.size[split] + nbytes > self.config.shard_max_bytes):
            self._flush(split)
        self.pending[split].append(sample)
        self.size[split] += nbytes

    def _flush(self, split: str) -> None:
        path = f"{split}/{split}-{self.index[split]:06d}.tar"
        size, sha256 = write_shard(self.root.join(path), self.pending[split])
        self.entries.append({"path": path, "split": split, "samples": len(self.pending[split]),
                             "bytes": size, "sha256": sha256})  # fmt: skip
        self.pending[split], self.size[split] = [], 0
        self.index[split] += 1

    def close(self) -> list[dict]:
        """Publishes the last partial shard of each split; returns the entries in split order."""
        for split in SPLITS:
            if self.pending[split]:
                self._flush(split)
        return sorted(self.entries, key=lambda e: (SPLITS.index(e["split"]), e["path"]))


def prepare(
    refs: list[InputRef],
    out: Location,
    config: PrepareConfig,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor = "processes",
) -> dict:
    """Runs the stage over ``refs`` and publishes shards, quarantine and manifest under ``out/shards``.

    Returns the manifest (also written, last, to ``out/shards/manifest.json``).
    """
    keys = [r.key for r in refs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"input keys collide: {dupes}")
    # Inputs run in key order, which is also the order of samples within a split's shards,
    # so shards are written as soon as they fill and only one per split is held in memory.
    refs = sorted(refs, key=lambda r: r.key)
    shards_root = out.join("shards")
    work = shards_root.join("_work")
    units = [refs[i : i + UNIT_INPUTS] for i in range(0, len(refs), UNIT_INPUTS)]
    unit_locs = [work.join(_unit_name(i, unit, config)) for i, unit in enumerate(units)]
    saved = [exists(loc) for loc in unit_locs]
    todo = [r for unit, is_saved in zip(units, saved, strict=True) if not is_saved for r in unit]
    if len(todo) < len(refs):
        log.info("resuming: %d of %d inputs saved in %s", len(refs) - len(todo), len(refs), work.uri)
    fresh = run_inputs(todo, config, workers, executor)
    # Withdraw the previous commit point before touching any shard it lists: readers trust
    # only a manifest, so while shards are being replaced there is none.
    delete(shards_root.join("manifest.json"))
    writer = _ShardWriter(shards_root, config)
    quarantine: list[dict] = []
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
                        outcomes.extend(_isolated(r, config) for r in unit[len(outcomes) :])
                        later = [r for r in todo if r.key > unit[-1].key]
                        fresh = run_inputs(later, config, workers, executor)
                        break
                    if progress:
                        progress(done + len(outcomes), len(refs))
            _save_unit(loc, outcomes)
        for outcome in outcomes:
            if outcome.reason:
                quarantine.append(
                    {"source": outcome.uri, "reason": outcome.reason, "message": outcome.message}
                )
            for sample in outcome.samples:
                writer.add(sample)
        done += len(unit)
        if progress:
            progress(done, len(refs))
    shard_entries = writer.close()
    n_samples = sum(e["samples"] for e in shard_entries)
    quarantined = len(quarantine)
    inputs_written = len(refs) - quarantined
    quarantine.sort(key=lambda q: q["source"])
    write_bytes(
        shards_root.join("quarantine.jsonl"),
        "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine).encode(),
    )
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    manifest = {
        "version": MANIFEST_VERSION,
        "mambastyle": __version__,
        "params": dataclasses.asdict(config),
        "params_hash": config.params_hash(),
        "counts": {
            "inputs": len(refs),
            "written": inputs_written,
            "quarantined": quarantined,
            "samples": n_samples,
            "quarantine_reasons": dict(sorted(reasons.items())),
        },
        "splits": {
            split: {
                "shards": sum(1 for e in shard_entries if e["split"] == split),
                "samples": sum(e["samples"] for e in shard_entries if e["split"] == split),
                "bytes": sum(e["bytes"] for e in shard_entries if e["split"] == split),
            }
            for split in SPLITS
        },
        "shards": shard_entries,
    }
    if manifest["counts"]["inputs"] != manifest["counts"]["written"] + manifest["counts"]["quarantined"]:
        raise AssertionError("counts do not add up")  # pragma: no cover - guarded by construction
    write_bytes(
        shards_root.join("manifest.json"), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    )
    # Shards a previous run left behind that this manifest does not list are no longer valid,
    # and the work files (under _work/) have served their purpose.
    listed = {shards_root.join(e["path"]).path for e in shard_entries}
    for path in list_files(shards_root):
        stale_tmp = posixpath.basename(path).startswith(".") and ".tmp-" in path  # left by a kill
        if (path.endswith(".tar") and path not in listed) or stale_tmp:
            delete(Location(out.fs, path, path))
    return manifest


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
    instance). Returns (manifest, the resolved root).
    """
    from tqdm import tqdm

    refs = inputs_from_source(source, options)
    out = resolve(root, options)
    if executor == "ray":
        from mambastyle.runtime import connect_ray

        connect_ray(ray_address, ray_cpus)
    with tqdm(total=len(refs), desc="prepare", unit="img", file=sys.stderr, disable=None) as bar:
        manifest = prepare(refs, out, config, workers=workers, executor=executor,
                           progress=lambda done, total: bar.update(done - bar.n))  # fmt: skip
    return manifest, out


def verify(out: Location) -> list[str]:
    """Re-hashes every shard the manifest lists; returns the problems found (empty = all good)."""
    shards_root = out.join("shards")
    manifest = json.loads(read_bytes(shards_root.join("manifest.json")))
    problems = []
    for entry in manifest["shards"]:
        loc = shards_root.join(entry["path"])
        try:
            data = read_bytes(loc)
        except (FileNotFoundError, OSError) as exc:
            problems.append(f"{entry['path']}: missing ({exc})")
            continue
        if len(data) != entry["bytes"]:
            problems.append(f"{entry['path']}: {len(data)} bytes, manifest says {entry['bytes']}")
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    return problems


def shard_urls(out: Location, split: str | None = None) -> list[str]:
    """URIs of the shards the manifest under ``out`` lists (optionally one split), in order."""
    manifest = json.loads(read_bytes(out.join("shards", "manifest.json")))
    shards = out.join("shards")
    return [shards.join(e["path"]).uri for e in manifest["shards"] if split is None or e["split"] == split]


def register_webdataset_s3(options: StorageOptions | None = None) -> None:
    """Lets ``webdataset`` open ``s3://`` URLs through the storage module's filesystem.

    webdataset has no S3 handler of its own; this registers one that reads with the same
    pyarrow filesystem (endpoint, region, AWS-chain credentials) as every stage.
    """
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function)

    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs):
        if "r" not in mode:
            raise ValueError("the s3 handler only reads")
        loc = resolve(url, options)
        return loc.fs.open_input_stream(loc.path)

    gopen.gopen_schemes["s3"] = open_s3
