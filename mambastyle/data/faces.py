"""One input -> its aligned faces, or the reason it is quarantined: the prepare stage's per-input
work, which runs in worker processes or Ray tasks (see executors). Its source files key the
stage's saved work (see prepare), so it imports only what computes the pixels and metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mambastyle.data.align import AlignmentUnavailable, Face, align_face, detect_faces, estimate_pose
from mambastyle.data.images import InputRejected, decode_image, encode_png
from mambastyle.data.inputs import InputRef, split_of
from mambastyle.data.shards import Sample

log = logging.getLogger(__name__)


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
    # deflate level (0-9) of the aligned PNGs: low levels trade a little size for much speed
    # (benchmarks/prepare.py)
    png_compress_level: int = 1
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)

    @classmethod
    def from_params(cls, p) -> PrepareConfig:
        """From params.yaml's ``prepare`` section (``config.PrepareParams``)."""
        return cls(
            output_size=p.output_size,
            multi_face=p.multi_face,
            min_face_size=p.min_face_size,
            min_score=p.min_score,
            upsample=p.upsample,
            max_pixels=p.max_pixels,
            shard_max_samples=p.shard_max_samples,
            shard_max_bytes=p.shard_max_bytes,
            split=(p.split.train, p.split.val, p.split.test),
        )

    def params_hash(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass
class Outcome:
    """What became of one input: its samples, or the reason it was quarantined."""

    uri: str
    samples: list[Sample] = field(default_factory=list)
    reason: str | None = None
    message: str | None = None
    sha256: str | None = None  # of the bytes read (first 16 hex digits); None when none were read


def input_sha256(data: bytes) -> str:
    """What the manifest records of an input's bytes: enough to tell a rewrite from a touch."""
    return hashlib.sha256(data).hexdigest()[:16]


def process_input(ref: InputRef, config: PrepareConfig) -> Outcome:
    """Decode, detect, align one input. Never raises for bad data: failures are outcomes."""
    digest = None
    try:
        if ref.error is not None:
            raise InputRejected(*ref.error)
        try:
            data = ref.read()
        except FileNotFoundError as exc:
            raise InputRejected("missing", str(exc)) from None
        digest = input_sha256(data)
        img, original_size = decode_image(data, config.max_pixels)
        pixels = np.asarray(img)  # one copy, shared by detection and alignment
        if ref.landmarks is not None:  # a known face: no detection
            lm = np.asarray(ref.landmarks, dtype=np.float64)
            lo, hi = lm.min(0), lm.max(0)
            box = ref.box or (int(lo[0]), int(lo[1]), int(np.ceil(hi[0])), int(np.ceil(hi[1])))
            faces = [Face(box, float("nan"), lm)]
        else:
            faces = detect_faces(pixels, upsample=config.upsample, min_score=config.min_score)
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
        return Outcome(ref.uri, samples, sha256=digest)
    except InputRejected as exc:
        return Outcome(ref.uri, reason=exc.reason, message=exc.message, sha256=digest)
    except (AlignmentUnavailable, MemoryError, OSError):
        # The environment, not the input: storage errors that outlived the client's retries,
        # a missing model, memory. Quarantining would drop inputs silently; stop instead.
        raise
    except Exception as exc:  # an unexpected failure on one input must not stop the batch
        log.exception("unexpected error on %s", ref.uri)
        return Outcome(
            ref.uri, reason="internal_error", message=f"{type(exc).__name__}: {exc}", sha256=digest
        )
