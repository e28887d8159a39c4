"""What the prepare stage reads: inputs with stable keys from a folder, an S3 prefix or FFHQ's
metadata (the demo set builds them too), and the stable split of a key."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field, replace

from mambastyle.storage import Location, list_versions, read_bytes


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
    # The bytes' version as listed (size and modification time, or a hash of in-memory data):
    # an incremental run compares it with the one recorded to find inputs rewritten in place.
    # None: unknown (the input is taken as unchanged).
    version: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.loc is None:
            raise ValueError(f"input {self.uri} has neither a location nor data")
        return read_bytes(self.loc)


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
    files = list_versions(source)
    if not files:
        raise FileNotFoundError(f"no input files under {source.uri}")
    base = source.path.rstrip("/") + "/"
    refs = []
    for path, version in files:
        rel = path[len(base) :] if path.startswith(base) else path.rsplit("/", 1)[-1]
        uri = source.uri.rstrip("/") + "/" + rel if path != source.path else source.uri
        refs.append(InputRef(make_key(rel), uri, loc=Location(source.fs, path, uri), version=version))
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
    return _with_versions(refs)


def _with_versions(refs: list[InputRef]) -> list[InputRef]:
    """``refs`` with the versions of their files, from one listing per folder they lie in (a
    file the listing lacks keeps None: reading it fails later, with the reason)."""
    folders = {posixpath.dirname(r.loc.path): r.loc for r in refs if r.loc is not None}
    versions: dict[str, str] = {}
    for folder, loc in folders.items():
        versions.update(list_versions(Location(loc.fs, folder, folder), recursive=False))
    return [replace(r, version=versions.get(r.loc.path)) if r.loc is not None else r for r in refs]
