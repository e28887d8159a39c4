"""A fast decoder for the common PNG: 8-bit grey, grey + alpha, RGB or RGBA, not interlaced.

Pillow spends about half of its PNG decoding in zlib and half in undoing the row filters,
one byte at a time. Here ISA-L inflates the pixel data and a compiled loop undoes the
filters (benchmarks/prepare.py measures the gain). Anything else (other depths, palettes, interlacing,
transparency chunks, EXIF, animation, a CRC or length that does not check out) is left to
Pillow, which also decides what a damaged file's error is: :func:`decode` returns None.
"""

from __future__ import annotations

import struct
import zlib

import numba as nb
import numpy as np

from mambastyle.data import PNG_SIGNATURE

try:
    from isal import isal_zlib as _inflater
except ImportError:  # pragma: no cover - a core dependency; zlib does the same job slower
    _inflater = zlib

_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
# Chunks that change what the pixels mean or how they are oriented: Pillow handles those files.
_DEFER = {b"tRNS", b"eXIf", b"acTL", b"PLTE"}


def decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, int] | None:
    """(pixels (H, W, C) uint8, colour type) of a plain 8-bit PNG, or None for Pillow to decode.

    Raises nothing for damaged data (returns None); ``max_pixels`` is checked before inflating.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, header, idat = len(PNG_SIGNATURE), None, []
    view = memoryview(data)
    while True:
        if pos + 12 > len(data):
            return None  # truncated
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return None
        body = view[pos + 8 : end - 4]
        if zlib.crc32(body, zlib.crc32(kind)) != struct.unpack_from(">I", data, end - 4)[0]:
            return None
        if header is None and kind != b"IHDR":
            return None
        if kind == b"IHDR":
            if length != 13:
                return None
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind in _DEFER or (kind in (b"tEXt", b"zTXt", b"iTXt") and b"exif" in bytes(body[:80]).lower()):
            return None
        pos = end
    width, height, depth, colour, compression, filtering, interlace = header
    if (depth, compression, filtering, interlace) != (8, 0, 0, 0) or colour not in _CHANNELS or not idat:
        return None
    if width == 0 or height == 0 or width * height > max_pixels:
        return None
    channels = _CHANNELS[colour]
    stride = width * channels
    try:
        raw = _inflater.decompress(b"".join(idat))
    except Exception:  # a damaged stream: Pillow names the error
        return None
    if len(raw) != height * (stride + 1):
        return None
    pixels = np.empty((height, stride), np.uint8)
    if not _unfilter(np.frombuffer(raw, np.uint8), pixels, channels):
        return None
    return pixels.reshape(height, width, channels), colour


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _unfilter(raw, out, bpp):  # pragma: no cover - compiled
    """Undoes PNG's per-row filters of ``raw`` into ``out`` (H, stride); False on a bad filter type.

    The row above the first is zeros, as is the pixel left of a row's first.
    """
    height, stride = out.shape
    zeros = np.zeros(stride, np.uint8)
    for r in range(height):
        kind = raw[r * (stride + 1)]
        cur = raw[r * (stride + 1) + 1 : (r + 1) * (stride + 1)]
        row = out[r]
        up = out[r - 1] if r > 0 else zeros
        if kind == 0:
            row[:] = cur
        elif kind == 1:  # Sub
            row[:bpp] = cur[:bpp]
            for i in range(bpp, stride):
                row[i] = cur[i] + row[i - bpp]
        elif kind == 2:  # Up
            for i in range(stride):
                row[i] = cur[i] + up[i]
        elif kind == 3:  # Average
            for i in range(bpp):
                row[i] = cur[i] + (up[i] >> 1)
            for i in range(bpp, stride):
                row[i] = cur[i] + np.uint8((np.int32(row[i - bpp]) + np.int32(up[i])) >> 1)
        elif kind == 4:  # Paeth
            for i in range(bpp):
                row[i] = cur[i] + up[i]  # left and upper left are zero: the predictor is the byte above
            for i in range(bpp, stride):
                a = np.int32(row[i - bpp])
                b = np.int32(up[i])
                c = np.int32(up[i - bpp])
                pa = abs(b - c)  # |p - a| with p = a + b - c
                pb = abs(a - c)
                pc = abs(a + b - 2 * c)
                pred = c
                if pb <= pc:
                    pred = b
                if pa <= pb and pa <= pc:
                    pred = a
                row[i] = cur[i] + np.uint8(pred)
        else:
            return False
    return True


def to_rgb(pixels: np.ndarray, colour: int) -> np.ndarray:
    """Grey, grey + alpha, RGB or RGBA (colour type) -> RGB. Alpha is composited onto white
    with the integer arithmetic of Pillow's ``Image.alpha_composite`` (7 fraction bits), so
    both decoders give the same bytes."""
    return pixels if colour == 2 else _to_rgb(pixels)


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _to_rgb(pixels):  # pragma: no cover - compiled
    h, w, channels = pixels.shape
    out = np.empty((h, w, 3), np.uint8)
    grey = channels <= 2
    alpha = channels in (2, 4)
    for i in range(h):
        for j in range(w):
            a = np.uint32(pixels[i, j, channels - 1]) if alpha else np.uint32(255)
            for c in range(3):
                v = np.uint32(pixels[i, j, 0 if grey else c])
                if alpha:
                    t = (v * a + 255 * (255 - a)) * 128 + (0x80 << 7)
                    v = (((t >> 8) + t) >> 8) >> 7
                out[i, j, c] = v
    return out
