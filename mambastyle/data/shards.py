"""The shard format, both directions: WebDataset tars of aligned faces and their manifest.

Layout under a root: ``shards/{split}/{split}-{index:06d}.tar`` whose samples are
``{key}.png`` + ``{key}.json`` (adjacent members, fixed tar metadata, so the same samples give
the same bytes); ``shards/quarantine.jsonl``; ``shards/manifest.json`` written last, the
commit point readers trust: per shard its path, split, sample count, bytes and sha256, and
counts that add up (inputs = written + quarantined). The prepare stage writes it; training,
invert and evaluate read it through this module only.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mambastyle.storage import Location, StorageOptions, delete, list_files, read_bytes, resolve, write_bytes

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


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


def sample_members(samples: Iterable[Sample]) -> Iterator[tuple[str, bytes]]:
    for s in samples:
        yield f"{s.key}.png", s.png
        yield f"{s.key}.json", s.meta_json


def build_shard(samples: Iterable[Sample]) -> bytes:
    """A deterministic tar: per sample ``{key}.png`` then ``{key}.json``, fixed member metadata."""
    return tar_bytes(sample_members(samples))


def write_shard(loc: Location, samples: Iterable[Sample], durable: bool = True) -> tuple[int, str]:
    """Writes the :func:`build_shard` tar of ``samples`` at ``loc`` (atomically, from its
    pieces, never joined in memory); returns its size and sha256."""
    pieces = tar_chunks(sample_members(samples))
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


def shard_path(split: str, index: int) -> str:
    """A shard's path below ``shards/``."""
    return f"{split}/{split}-{index:06d}.tar"


class ShardWriter:
    """Packs samples into ``{split}/{split}-{index:06d}.tar`` shards as they arrive (in order),
    publishing each shard when the next sample would exceed its sample or byte limit. Indices
    start at ``start[split]`` (0 by default: an incremental run appends after the last shard).
    Each entry lists the keys of the inputs its samples came from (``inputs``)."""

    def __init__(self, shards_root: Location, max_samples: int, max_bytes: int, start: dict | None = None):
        self.root, self.max_samples, self.max_bytes = shards_root, max_samples, max_bytes
        self.pending: dict[str, list[Sample]] = {split: [] for split in SPLITS}
        self.inputs: dict[str, set[str]] = {split: set() for split in SPLITS}
        self.size: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self.index: dict[str, int] = {split: (start or {}).get(split, 0) for split in SPLITS}
        self.entries: list[dict] = []

    def add(self, sample: Sample, input_key: str) -> None:
        split, nbytes = sample.split, len(sample.png) + 2048  # png + json + tar headers, roughly
        full = len(self.pending[split]) >= self.max_samples
        if self.pending[split] and (full or self.size[split] + nbytes > self.max_bytes):
            self._flush(split)
        self.pending[split].append(sample)
        self.inputs[split].add(input_key)
        self.size[split] += nbytes

    def _flush(self, split: str) -> None:
        path = shard_path(split, self.index[split])
        size, sha256 = write_shard(self.root.join(path), self.pending[split])
        self.entries.append({"path": path, "split": split, "samples": len(self.pending[split]), "bytes": size,
                             "sha256": sha256, "inputs": sorted(self.inputs[split])})  # fmt: skip
        self.pending[split], self.size[split], self.inputs[split] = [], 0, set()
        self.index[split] += 1

    def close(self) -> list[dict]:
        """Publishes the last partial shard of each split; returns the entries in split order."""
        for split in SPLITS:
            if self.pending[split]:
                self._flush(split)
        return sorted(self.entries, key=lambda e: (SPLITS.index(e["split"]), e["path"]))


def build_manifest(params: dict, params_hash: str, version: str, inputs: int, quarantine: list[dict],
                   entries: list[dict], input_versions: dict[str, str] | None = None,
                   input_sha256: dict[str, str] | None = None) -> dict:  # fmt: skip
    """The manifest of a finished run (``entries`` from :class:`ShardWriter`); its counts add up.
    ``input_versions``: input key -> its version as listed when read (``InputRef.version``);
    ``input_sha256``: input key -> the first 16 hex digits of the sha256 of the bytes read."""
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    manifest = {
        "version": MANIFEST_VERSION,
        "mambastyle": version,
        "params": params,
        "params_hash": params_hash,
        "counts": {
            "inputs": inputs,
            "written": inputs - len(quarantine),
            "quarantined": len(quarantine),
            "samples": sum(e["samples"] for e in entries),
            "quarantine_reasons": dict(sorted(reasons.items())),
        },
        "splits": {
            split: {
                "shards": sum(1 for e in entries if e["split"] == split),
                "samples": sum(e["samples"] for e in entries if e["split"] == split),
                "bytes": sum(e["bytes"] for e in entries if e["split"] == split),
            }
            for split in SPLITS
        },
        "shards": entries,
        "input_versions": dict(sorted((input_versions or {}).items())),
        "input_sha256": dict(sorted((input_sha256 or {}).items())),
    }
    if manifest["counts"]["written"] < 0:
        raise ValueError(f"{len(quarantine)} quarantined out of {inputs} inputs")
    return manifest


def commit(shards_root: Location, manifest: dict, quarantine: list[dict]) -> None:
    """Writes the quarantine, then the manifest (the commit point), then removes the shards a
    previous run left that this manifest does not list, and stale temporary files."""
    quarantine = sorted(quarantine, key=lambda q: q["source"])
    write_bytes(
        shards_root.join("quarantine.jsonl"),
        "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine).encode(),
    )
    write_bytes(
        shards_root.join("manifest.json"), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    )
    listed = {shards_root.join(e["path"]).path for e in manifest["shards"]}
    for path in list_files(shards_root):
        stale_tmp = posixpath.basename(path).startswith(".") and ".tmp-" in path  # left by a kill
        if (path.endswith(".tar") and path not in listed) or stale_tmp:
            delete(Location(shards_root.fs, path, path))


def withdraw(shards_root: Location) -> None:
    """Removes the commit point before shards are replaced: readers trust only a manifest."""
    delete(shards_root.join("manifest.json"))


# --------------------------------------------------------------------------- reading


class ShardError(ValueError):
    """A shard is missing, unreadable or does not hold well-formed samples (names the shard)."""


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    samples: int


def manifest_shards(root: Location, split: str) -> list[ShardInfo]:
    """The shards of ``split`` that the manifest under ``root/shards`` lists."""
    loc = root.join("shards", "manifest.json")
    try:
        manifest = json.loads(read_bytes(loc))
    except FileNotFoundError:
        raise ShardError(f"no shard manifest at {loc.uri}: run the prepare stage first") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"unreadable shard manifest {loc.uri}: {exc}") from None
    shards_root = root.join("shards")
    return [
        ShardInfo(shards_root.join(e["path"]).uri, int(e["samples"]))
        for e in manifest.get("shards", [])
        if e.get("split") == split and int(e.get("samples", 0)) > 0
    ]


def check_feeds(shards: list[ShardInfo], world: int) -> None:
    """Raises ShardError unless ``shards`` hold at least one sample for each of ``world`` readers."""
    if not shards:
        raise ShardError("no training shards: the manifest lists no samples for this split")
    total = sum(s.samples for s in shards)
    if total < world:
        raise ShardError(f"{total} training samples cannot feed {world} workers")


def read_shard(uri: str, options: StorageOptions | None = None) -> Iterator[tuple[str, bytes]]:
    """(key, PNG bytes) of each sample of one shard, in order, streamed (not held whole).

    Raises:
        ShardError: unreadable tar, a sample without ``.png``, or a sample split apart.
    """
    loc = resolve(uri, options)
    try:
        stream = loc.fs.open_input_stream(loc.path)
    except (FileNotFoundError, OSError) as exc:
        raise ShardError(f"{uri}: cannot open shard ({exc})") from None
    seen: set[str] = set()
    key, png = None, None

    def finish():
        if key is None:
            return None
        if png is None:
            raise ShardError(f"{uri}: sample {key!r} has no .png member")
        seen.add(key)
        return key, png

    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if "/" in name or "." not in name:
                    raise ShardError(f"{uri}: unexpected member {name!r} (expected KEY.EXT)")
                k, ext = name.split(".", 1)
                if k != key:
                    done = finish()
                    if done:
                        yield done
                    if k in seen:
                        raise ShardError(f"{uri}: the files of sample {k!r} are not adjacent")
                    key, png = k, None
                f = tar.extractfile(member)  # a file object over the stream, nothing touches disk
                data = f.read() if f is not None else b""
                if ext == "png":
                    png = data
            done = finish()
            if done:
                yield done
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"{uri}: corrupt shard ({exc})") from None


def read_samples(loc: Location) -> list[Sample]:
    """Every sample of one shard with its metadata, in order (for rewriting the shard)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(loc)), mode="r:") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # memory only
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"{loc.uri}: corrupt shard ({exc})") from None
    samples = []
    for name in files:
        if name.endswith(".png"):
            key = name[: -len(".png")]
            meta_json = files.get(f"{key}.json")
            if meta_json is None:
                raise ShardError(f"{loc.uri}: sample {key!r} has no .json member")
            samples.append(Sample(key, json.loads(meta_json)["split"], files[name], meta_json))
    return samples


def decode_png(data: bytes, where: str) -> torch.Tensor:  # noqa: F821 (imported inside)
    """PNG bytes -> (3, H, W) uint8."""
    import torch  # only readers that make tensors need it; the prepare workers do not

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad sample
        raise ShardError(f"{where}: undecodable PNG ({exc})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


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
