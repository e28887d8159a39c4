"""Plain edit functions: (codes, edits) -> edited codes -> rendered images. No Ray here."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mambastyle.directions import Direction, DirectionError, GanspaceDirection, check_layers

NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class Edit:
    """A named direction applied at each of ``strengths`` to the styles in ``layers``."""

    name: str
    direction: Direction | GanspaceDirection
    strengths: tuple[float, ...]
    layers: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise DirectionError(f"edit name {self.name!r}: use letters, digits and underscores only")
        self.strengths = parse_strengths(self.strengths, self.name)
        self.layers = check_layers(self.layers, self.direction.shape[0])

    def describe(self) -> dict:
        """What identifies the edit (for run ids, table metadata and manifests)."""
        return {
            "name": self.name,
            "kind": type(self.direction).__name__,
            "source": self.direction.source,
            "sha256": self.direction.sha256,
            "strengths": list(self.strengths),
            "layers": list(self.layers),
            **({"fit": _fit_summary(self.direction.info)} if self.direction.info.get("model") else {}),
            **({"component": self.direction.info["component"]} if "component" in self.direction.info else {}),
        }


def _fit_summary(info: dict) -> dict:
    keep = ("column", "where", "space", "kind", "rows", "quality", "model", "table")
    return {k: info[k] for k in keep if k in info}


def parse_strengths(values, name: str = "edit") -> tuple[float, ...]:
    """Strengths as a tuple of distinct finite floats, from numbers or a "-3,0,1.5" string."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = []
    for v in values:
        if isinstance(v, bool):
            raise DirectionError(f"{name}: strength {v!r} is not a number")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise DirectionError(f"{name}: strength {v!r} is not a number") from None
        if not math.isfinite(f):
            raise DirectionError(f"{name}: strength {v!r} is not finite")
        out.append(f)
    if not out:
        raise DirectionError(f"{name}: no strengths given")
    if len(set(out)) != len(out):
        raise DirectionError(f"{name}: repeated strengths {out}")
    return tuple(out)


def strength_label(strength: float) -> str:
    """A file-name-safe, dot-free, unique label: -3.0 -> "m3", 1.5 -> "p1_5", 0.0 -> "0"."""
    if strength == 0:
        return "0"
    text = repr(abs(float(strength)))
    text = text[:-2] if text.endswith(".0") else text
    return ("m" if strength < 0 else "p") + text.replace(".", "_").replace("e-", "en").replace("+", "")


def apply_edits(w_plus: np.ndarray, edits: Sequence[Edit]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Every (row, edit, strength) combination of ``w_plus`` (n, S, D) float32.

    Returns the edited codes (n * sum(len(strengths)), S, D) float32 and, per output row,
    (input row, edit index, strength index). Strength 0 returns the input codes unchanged,
    bit for bit -- except for an ``absolute`` GANSpace edit, where 0 is a coordinate to move to.
    """
    w = np.asarray(w_plus, dtype=np.float32)
    out, index = [], []
    for e_idx, edit in enumerate(edits):
        if edit.direction.shape != w.shape[1:]:
            raise DirectionError(
                f"{edit.name}: direction shape {edit.direction.shape} does not fit codes {w.shape[1:]}"
            )
        for s_idx, strength in enumerate(edit.strengths):
            if strength == 0 and edit.direction.identity_at_zero:
                out.append(w.copy())
            else:
                out.append(w + edit.direction.delta(w, strength, edit.layers))
            index.extend((r, e_idx, s_idx) for r in range(w.shape[0]))
    if not out:
        return np.zeros((0, *w.shape[1:]), np.float32), []
    return np.concatenate(out), index


def render(generator, w_plus: np.ndarray, batch_size: int) -> np.ndarray:
    """Images of codes (n, S, D): (n, R, R, 3) uint8, rendered with constant noise in batches
    of exactly ``batch_size`` (the last padded), so an image does not depend on its batch."""
    import torch

    from mambastyle.visual import to_uint8

    device = generator.latent_avg.device
    out = []
    with torch.no_grad():
        for start in range(0, len(w_plus), batch_size):
            chunk = np.array(w_plus[start : start + batch_size], np.float32)
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.float32)])
            w = torch.from_numpy(chunk).to(device)
            out.append(to_uint8(generator.synthesis(w, noise_mode="const"))[:n])
    if not out:
        r = generator.resolution
        return np.zeros((0, r, r, 3), np.uint8)
    return np.concatenate(out)


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (fast zlib level: edited images are many and large)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def fused_edits(
    generator, model, images: np.ndarray, edits: Sequence[Edit], batch_size: int
) -> tuple[np.ndarray, list[tuple[int, int, int]], np.ndarray]:
    """F-space edits of source images: each image is re-encoded by ``model`` (a
    ``FuserModel``: the encoder and the fuser trained with it) into its code ``w`` and
    features ``C``; every (edit, strength) adds ``d`` to ``w`` and renders
    ``G(w + d, feature_offset = fuser(C, d))``. Strength 0 is the fuser's reconstruction.

    ``images`` (n, H, W, 3) uint8. Encoding and rendering run in batches of exactly
    ``batch_size`` (the last padded), so an image does not depend on its batch.

    Returns (edited codes (m, S, D) float32, per output row (input row, edit, strength index)
    as :func:`apply_edits`, images (m, R, R, 3) uint8).
    """
    import torch

    from mambastyle.models.fuser import fused_synthesis
    from mambastyle.models.inversion import prepare_images
    from mambastyle.visual import to_uint8

    device = model.latent_avg.device
    n = len(images)
    codes, features = [], []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            k = len(chunk)
            if k < batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros((batch_size - k, *chunk.shape[1:]))])
            x = prepare_images(chunk, model.input_size).to(device)
            w, c = model.encoder(x, return_features=True)
            codes.append(w[:k].float().cpu().numpy())
            features.append(c[:k])
    w = np.concatenate(codes) if codes else np.zeros((0, *generator.latent_avg.shape), np.float32)
    feats = torch.cat(features) if features else None
    edited, index = apply_edits(w, edits)
    rows = np.array([r for r, _, _ in index], dtype=np.int64)
    out = []
    with torch.no_grad():
        for start in range(0, len(edited), batch_size):
            code = np.array(edited[start : start + batch_size], np.float32)
            k = len(code)
            src = rows[start : start + batch_size]
            delta = code - w[src]
            if k < batch_size:
                pad = np.zeros((batch_size - k, *code.shape[1:]), np.float32)
                code, delta = np.concatenate([code, pad]), np.concatenate([delta, pad])
                src = np.concatenate([src, np.full(batch_size - k, src[0])])
            code_t, delta_t = torch.from_numpy(code).to(device), torch.from_numpy(delta).to(device)
            y = fused_synthesis(
                generator, model.fuser, code_t, feats[torch.from_numpy(src).to(feats.device)], delta_t
            )
            out.append(to_uint8(y)[:k])
    r = generator.resolution
    return edited, index, np.concatenate(out) if out else np.zeros((0, r, r, 3), np.uint8)
