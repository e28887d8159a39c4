"""Single-photo inversion and editing for the interactive service: the pipeline's models held in
one process, requests answered in batches. No HTTP and no Ray here (``serve.app`` adds them).

A photo goes through the prepare stage's own per-input work (:func:`process_input`: decoding
with its limits, detection, FFHQ alignment, pose), so a served face is the face the pipeline
would have written, and a photo the stage would quarantine is refused with the same reason.
Codes come from the encoder the latent table was inverted with (and its fuser), rendered by the
configured generator, which must be the table's.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mambastyle.data.faces import PrepareConfig, process_input
from mambastyle.data.inputs import InputRef
from mambastyle.edit.core import Edit, png_bytes
from mambastyle.edit.pipeline import EditError, load_fuser_model, read_sources
from mambastyle.edit.stage import build_edit, fuser_checkpoint, open_for_generator
from mambastyle.errors import CheckpointError
from mambastyle.storage import StorageOptions, resolve

# What the prepare stage quarantines a photo for -> the HTTP status a request gets for it.
REJECTION_STATUS = {
    "empty_file": 400,
    "not_an_image": 415,
    "decode_error": 415,
    "too_large": 413,
    "no_face": 422,
    "too_small": 422,
    "multiple_faces": 422,
}


# A request's strength may reach this multiple of the largest configured one: beyond the sliders'
# range for experiments, never so far that float32 codes overflow.
STRENGTH_REACH = 10.0


class ServeError(RuntimeError):
    """The service cannot start: missing or mismatched models, tables or directions."""


class RequestError(Exception):
    """A request that cannot be answered: an HTTP ``status``, a stable ``reason`` code, a message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    def to_json(self) -> dict:
        return {"error": {"reason": self.reason, "message": self.message}}


@dataclass
class Face:
    """An inverted face: what an edit of it needs, and what ``/v1/invert`` reports."""

    aligned: np.ndarray  # (H, W, 3) uint8, the prepare stage's crop
    w_plus: np.ndarray  # (n_styles, style_dim) float32
    features: object | None  # the encoder's features for the fuser (a tensor), fuser tables only
    pose: dict  # yaw, pitch, roll in degrees
    reconstruction: np.ndarray | None = None  # (R, R, 3) uint8 in the service's default mode
    mse: float | None = None  # of the reconstruction against the crop, at the encoder's input size
    table_w: np.ndarray | None = None  # a table key's own code: what W+ mode edits, as the edit stage


def _png_b64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


class _Cache:
    """A small thread-safe LRU of faces by source (an upload's sha256, or a table key)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: str) -> Face | None:
        with self.lock:
            face = self.items.get(key)
            if face is not None:
                self.items.move_to_end(key)
            return face

    def put(self, key: str, face: Face) -> None:
        if self.size == 0:
            return
        with self.lock:
            self.items[key] = face
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


def default_table(params, invert_out: str = "data/invert") -> str | None:
    """The table served when none is named: ``serve.table``, ``edit.table``, else the one the
    invert stage last committed (named in its DVC record)."""
    from mambastyle.stage import invert_record

    if params.serve.table or params.edit.table:
        return params.serve.table or params.edit.table
    record = invert_record(invert_out)
    return None if record is None else record["table"]


class Studio:
    """The served models and directions. Methods that take lists are the batched steps (one
    forward for all the requests in the batch); the rest are a request's own work."""

    def __init__(
        self,
        generator,
        encoder,
        model,
        edits: Sequence[Edit],
        table,
        prepare: PrepareConfig,
        root,
        options: StorageOptions | None,
        mode: str = "w_plus",
        cache_entries: int = 64,
        max_edits: int = 16,
        device: str = "cpu",
        info: dict | None = None,
        precision: str = "fp32",
    ):
        if mode == "fuser" and model is None:
            raise ServeError("mode fuser needs a table inverted with a fuser")
        self.generator, self.encoder, self.model = generator, encoder, model
        self.edits = {e.name: e for e in edits}
        self.table, self.prepare, self.root, self.options = table, prepare, root, options
        self.mode, self.max_edits, self.device, self.precision = mode, max_edits, device, precision
        self.cache = _Cache(cache_entries)
        self.info = info or {}
        self._index_keys()

    def _index_keys(self) -> None:
        """key -> (part, row) of the table, read once (the key column only): a lookup then reads
        one row's row group, not a scan of every part's codes."""
        self._fragments, self._rows = [], {}
        if self.table is None:
            return
        for f_idx, fragment in enumerate(self.table.dataset.get_fragments()):
            self._fragments.append(fragment)
            for row, key in enumerate(fragment.to_table(columns=["key"]).column("key").to_pylist()):
                self._rows[key] = (f_idx, row)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_params(cls, params, table_uri: str | None = None, device: str = "cpu") -> Studio:
        """The service the params describe: the latent table ``table_uri`` (else ``serve.table``,
        ``edit.table``), its encoder and fuser, the configured generator (checked against the
        table), and the directions of ``serve.edits`` (else ``edit.edits``), fitted on the table
        where they say so.

        Raises:
            ServeError: anything missing or not belonging together, named.
        """
        from mambastyle.checkpoints import checkpoint_source, file_sha256, load_encoder
        from mambastyle.generate import resolve_generator

        sp, gp = params.serve, params.generator
        options = params.storage.options()
        uri = table_uri or default_table(params)
        if uri is None:
            raise ServeError(
                "no latent table: set serve.table (or edit.table), or run the invert stage first"
            )
        try:
            generator = resolve_generator(
                gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples, device, options
            )
            table, _ = open_for_generator(uri, generator, options)
            meta = table.metadata
            model = encoder = None
            if meta.get("fuser_sha256"):
                model = load_fuser_model(fuser_checkpoint(params, table), options, device)
                encoder = model.encoder
            else:
                src = checkpoint_source(resolve(meta["encoder_uri"], options).uri, options)
                if file_sha256(src.getvalue() if hasattr(src, "getvalue") else src) != meta["encoder_sha256"]:
                    raise ServeError(
                        f"{meta['encoder_uri']} is not the encoder {table.prefix.uri} was inverted with"
                    )
                encoder, _ = load_encoder(src, device=device)
                encoder.eval()
            edits = [build_edit(entry, table, options, uri) for entry in (sp.edits or params.edit.edits)]
        except (EditError, CheckpointError, FileNotFoundError) as exc:
            raise ServeError(str(exc)) from None
        mode = sp.mode if model is not None else "w_plus"
        info = {
            "table": table.prefix.uri,
            "rows": table.manifest.get("rows"),
            "encoder": meta["encoder_uri"],
            "fuser": meta.get("fuser_uri"),
            "resolution": generator.resolution,
        }
        return cls(
            generator,
            encoder,
            model,
            edits,
            table,
            PrepareConfig.from_params(params.prepare),
            resolve(params.storage.root, options),
            options,
            mode,
            sp.cache_entries,
            sp.max_edits,
            device,
            info,
            sp.precision,
        )

    # ------------------------------------------------------------------ what is served

    def directions(self) -> list[dict]:
        """The directions on offer: name, where they come from, and the strength range their
        configured strengths span (0 included: no edit)."""
        out = []
        for e in self.edits.values():
            lo, hi = min(0.0, *e.strengths), max(0.0, *e.strengths)
            entry = {
                "name": e.name,
                "source": e.direction.source,
                "kind": type(e.direction).__name__,
                "strength": {"min": lo, "max": hi, "default": 0.0},
                "layers": list(e.layers),
            }
            if not e.direction.identity_at_zero:  # an absolute GANSpace coordinate
                entry["strength"]["default"] = None
            out.append(entry)
        return out

    # ------------------------------------------------------------------ a request's own work

    def align(self, data: bytes) -> tuple[np.ndarray, dict]:
        """A photo's aligned face and pose, as the prepare stage makes them (its largest face).

        Raises:
            RequestError: what the prepare stage would quarantine the photo for.
        """
        from PIL import Image

        outcome = process_input(InputRef("upload", "upload", data=data), self.prepare)
        if outcome.reason is not None:
            if outcome.reason not in REJECTION_STATUS:  # the details are in the log, not the answer
                raise RequestError(
                    500, "internal_error", "the photo could not be processed (see the server's log)"
                )
            raise RequestError(
                REJECTION_STATUS[outcome.reason], outcome.reason, outcome.message or outcome.reason
            )
        sample = outcome.samples[0]
        meta = sample.meta
        aligned = np.array(Image.open(io.BytesIO(sample.png)).convert("RGB"))
        return aligned, {k: meta[k] for k in ("yaw", "pitch", "roll")}

    @staticmethod
    def upload_id(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def cached(self, source: str) -> Face | None:
        return self.cache.get(source)

    def remember(self, source: str, face: Face) -> None:
        self.cache.put(source, face)

    def row(self, key: str) -> tuple[np.ndarray, dict, np.ndarray | None]:
        """A key of the table: its code, pose, and (fuser mode) its aligned face from the shards.

        Raises:
            RequestError: 404 unknown_key.
        """
        import pyarrow.dataset as pads

        if not isinstance(key, str) or not key or len(key) > 1000:
            raise RequestError(422, "bad_key", "key must be a non-empty string")
        where = self._rows.get(key)
        if where is None:
            raise RequestError(404, "unknown_key", f"no row with key {key[:200]!r} in the served table")
        fragment = self._fragments[where[0]]
        names = fragment.physical_schema.names
        columns = [c for c in ("shard", "w_plus", "yaw", "pitch", "roll") if c in names]
        rows = fragment.take([where[1]], columns=columns)
        w = self.table.w_plus(rows)[0].copy()
        pose = {k: rows.column(k)[0].as_py() for k in ("yaw", "pitch", "roll") if k in columns}
        aligned = None
        if self.model is not None:
            split = pads.get_partition_keys(fragment.partition_expression).get("split")
            aligned = read_sources(
                self.root, [key], [split], [rows.column("shard")[0].as_py()], self.options
            )[0]
        return w, pose, aligned

    def parse_edits(self, edits) -> list[tuple[Edit, float]]:
        """A request's ``edits`` ([{"direction": NAME, "strength": S}, ...]) checked.

        Raises:
            RequestError: 422 bad_edits / unknown_direction / bad_strength.
        """
        if not isinstance(edits, list):
            raise RequestError(422, "bad_edits", "edits must be a list of {direction, strength} objects")
        if len(edits) > self.max_edits:
            raise RequestError(422, "bad_edits", f"{len(edits)} edits; at most {self.max_edits} per request")
        out = []
        for item in edits:
            if not isinstance(item, dict) or set(item) - {"direction", "strength"} or "direction" not in item:
                raise RequestError(422, "bad_edits", 'each edit is {"direction": NAME, "strength": NUMBER}')
            name, strength = item["direction"], item.get("strength")
            if not isinstance(name, str) or name not in self.edits:
                raise RequestError(
                    422,
                    "unknown_direction",
                    f"no direction {str(name)[:100]!r}; GET /v1/directions lists them",
                )
            edit = self.edits[name]
            if strength is None and edit.direction.identity_at_zero:
                strength = 0.0  # no strength: no move (an absolute coordinate has no such default)
            if (
                isinstance(strength, bool)
                or not isinstance(strength, int | float)
                or not math.isfinite(strength)
            ):
                raise RequestError(422, "bad_strength", f"strength of {name!r} must be a finite number")
            reach = STRENGTH_REACH * max(abs(v) for v in (*edit.strengths, 1.0))
            if abs(strength) > reach:
                raise RequestError(422, "bad_strength", f"strength of {name!r} beyond +-{reach:g}")
            out.append((edit, float(strength)))
        return out

    def check_mode(self, mode) -> str:
        mode = self.mode if mode is None else mode
        if mode not in ("w_plus", "fuser"):
            raise RequestError(422, "bad_mode", 'mode is "w_plus" or "fuser"')
        if mode == "fuser" and self.model is None:
            raise RequestError(422, "bad_mode", "fuser mode: the served table was inverted without a fuser")
        return mode

    # ------------------------------------------------------------------ batched steps

    def encode(self, faces: Sequence[np.ndarray], poses: Sequence[dict]) -> list[Face]:
        """Aligned faces -> inverted :class:`Face` s, with their reconstruction in the default
        mode and its MSE (as the invert stage measures it) in one batch."""
        import torch
        import torch.nn.functional as F

        from mambastyle.models.fuser import fused_synthesis
        from mambastyle.models.inversion import inference_precision, prepare_images
        from mambastyle.visual import to_uint8

        size = self.encoder.config.input_size
        with torch.no_grad(), inference_precision(self.device, self.precision):
            # one at a time to the encoder's input size: a table's shards may hold another crop
            # size than uploads get under the current prepare params
            x = torch.cat(
                [prepare_images(torch.from_numpy(np.ascontiguousarray(f))[None], size) for f in faces]
            )
            x = x.to(self.device)
            if self.model is not None:
                w, features = self.encoder(x, return_features=True)
            else:
                w, features = self.encoder(x), None
            if self.mode == "fuser":
                y = fused_synthesis(self.generator, self.model.fuser, w, features)
            else:
                y = self.generator.synthesis(w, noise_mode="const")
            small = F.interpolate(
                y.float(), size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True
            )
            mse = (small - x).pow(2).flatten(1).mean(1).cpu().numpy()
            images = to_uint8(y)
        codes = w.float().cpu().numpy()
        return [
            Face(  # copies: a cached face must not hold on to its whole batch
                faces[i],
                codes[i].copy(),
                None if features is None else features[i : i + 1].clone(),
                dict(poses[i]),
                images[i].copy(),
                float(mse[i]),
            )
            for i in range(len(faces))
        ]

    def render(self, items: Sequence[tuple[Face, list[tuple[Edit, float]], str]]) -> list[bytes]:
        """Edited images as PNG bytes, one per (face, edits, mode): the edits are added one after
        the other (each direction's step at the code the previous ones reached) and rendered
        together. W+ mode edits a table key's own code (as the edit stage does); fuser mode
        the face's code re-encoded with its features (as the edit stage's fuser mode does)."""
        import torch

        from mambastyle.models.inversion import inference_precision
        from mambastyle.visual import to_uint8

        codes = []
        for face, edits, mode in items:
            start = face.table_w if mode == "w_plus" and face.table_w is not None else face.w_plus
            w = start[None].astype(np.float32)
            for edit, strength in edits:
                if strength != 0 or not edit.direction.identity_at_zero:
                    w = w + edit.direction.delta(w, strength, edit.layers).astype(np.float32)
            codes.append(w[0])
        out: list[np.ndarray | None] = [None] * len(items)
        with torch.no_grad(), inference_precision(self.device, self.precision):
            for mode in ("w_plus", "fuser"):
                idx = [i for i, (_, _, m) in enumerate(items) if m == mode]
                if not idx:
                    continue
                code = torch.from_numpy(np.stack([codes[i] for i in idx])).to(self.device)
                if mode == "w_plus":
                    y = self.generator.synthesis(code, noise_mode="const")
                else:
                    from mambastyle.models.fuser import fused_synthesis

                    base = torch.from_numpy(np.stack([items[i][0].w_plus for i in idx])).to(self.device)
                    feats = torch.cat([items[i][0].features for i in idx])
                    y = fused_synthesis(self.generator, self.model.fuser, code, feats, code - base)
                for i, image in zip(idx, to_uint8(y), strict=True):
                    out[i] = image
        return [png_bytes(image) for image in out]

    # ------------------------------------------------------------------ responses

    @staticmethod
    def invert_response(face: Face) -> dict:
        return {
            "w_plus": face.w_plus.tolist(),
            **{k: face.pose.get(k) for k in ("yaw", "pitch", "roll")},
            "mse": face.mse,
            "aligned": _png_b64(face.aligned),
            "reconstruction": _png_b64(face.reconstruction),
        }


def describe(studio: Studio) -> str:
    """One line for logs: what is served."""
    return json.dumps({**studio.info, "mode": studio.mode, "directions": sorted(studio.edits)})
