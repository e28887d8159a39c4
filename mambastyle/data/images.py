"""Decoding untrusted image bytes into RGB, with a reason code for every failure."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mambastyle.data import PNG_SIGNATURE

try:  # ISA-L's deflate: levels 0-3, faster than zlib's
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - a core dependency; zlib does the same job slower
    _isal_zlib = None

# Raster formats decoded from untrusted bytes (no EPS/PDF-style formats that call external
# interpreters).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "TGA")


class InputRejected(Exception):
    """An input that cannot become a sample; ``reason`` is a stable code for quarantine records."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit and float images are rescaled, alpha is dropped onto white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decodes ``data`` into an RGB image with EXIF orientation applied.

    Returns:
        (RGB image, original (width, height) as stored in the file).

    Raises:
        InputRejected: ``empty_file``, ``not_an_image``, ``too_large`` (more than
            ``max_pixels``, checked before decoding the pixels; Pillow's own limit,
            ``Image.MAX_IMAGE_PIXELS``, also applies) or ``decode_error`` (truncated or
            corrupt data, or a mode with no RGB conversion).
    """
    if not data:
        raise InputRejected("empty_file", "zero bytes")
    if data.startswith(PNG_SIGNATURE):  # the common 8-bit PNG by the fast decoder, the rest by Pillow
        from mambastyle.data import _png

        fast = _png.decode(data, min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels))
        if fast is not None:
            pixels, colour = fast
            return Image.fromarray(_png.to_rgb(pixels, colour), "RGB"), (pixels.shape[1], pixels.shape[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise InputRejected("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
            img.load()
    except InputRejected:
        raise
    except UnidentifiedImageError:
        raise InputRejected("not_an_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputRejected("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt streams
        raise InputRejected("decode_error", str(exc) or type(exc).__name__) from None
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # a malformed EXIF block must not lose the image
        warnings.warn(f"ignoring unreadable EXIF orientation: {exc}", stacklevel=2)
    try:
        return _to_rgb(img), (width, height)
    except (OSError, ValueError) as exc:  # modes without an RGB conversion, broken palettes
        raise InputRejected("decode_error", f"cannot convert mode {img.mode} to RGB: {exc}") from None


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """An (H, W, 3) uint8 RGB array as PNG bytes (8-bit RGB, no interlacing, no metadata).

    Every row uses PNG's "Up" filter (the byte above subtracted) and the rows are deflated at
    ``level`` (0-9) by ISA-L for levels 0-3 (its level 0 still compresses, fastest), by zlib
    above or where ``isal`` is missing. One fixed filter is much faster than Pillow's encoder,
    which tries all five on every row, for slightly larger files (benchmarks/prepare.py).
    With the same library build and CPU, the same pixels and level give the same
    bytes (a reproducible shard); another deflate implementation gives other bytes, never
    other pixels.
    """
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must be 0-9, got {level}")
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"expected a non-empty (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = rgb.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 2  # filter type "Up"; the first row's "above" is zeros
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # wraps modulo 256, as the filter does
    deflate = _isal_zlib.compress if _isal_zlib is not None and level <= 3 else zlib.compress
    return b"".join((
        PNG_SIGNATURE,
        png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
        png_chunk(b"IDAT", deflate(raw.tobytes(), level)),
        png_chunk(b"IEND", b""),
    ))  # fmt: skip
