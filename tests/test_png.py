"""The fast PNG decoder against Pillow, and the files it leaves to Pillow."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mambastyle.data import _png
from mambastyle.data.images import PNG_SIGNATURE, InputRejected, _to_rgb, decode_image, png_chunk

MODES = {0: "L", 4: "LA", 2: "RGB", 6: "RGBA"}


def _filter_row(kind: int, row: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """PNG's row filter ``kind`` applied to ``row`` (the encoder's side, written independently)."""
    x, b = row.astype(np.int32), above.astype(np.int32)
    a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
    c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])
    if kind == 0:
        pred = np.zeros_like(x)
    elif kind == 1:
        pred = a
    elif kind == 2:
        pred = b
    elif kind == 3:
        pred = (a + b) // 2
    else:
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return ((x - pred) % 256).astype(np.uint8)


def encode(pixels: np.ndarray, colour: int, rng) -> bytes:
    """An 8-bit PNG of ``pixels`` with a random filter on every row, its data split over IDATs."""
    h, w, ch = pixels.shape
    rows = pixels.reshape(h, w * ch)
    raw = bytearray()
    for r in range(h):
        kind = int(rng.integers(0, 5))
        above = rows[r - 1] if r else np.zeros(w * ch, np.uint8)
        raw += bytes([kind]) + _filter_row(kind, rows[r], above, ch).tobytes()
    stream = zlib.compress(bytes(raw), 6)
    cut = len(stream) // 3
    return b"".join([
        PNG_SIGNATURE,
        png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)),
        png_chunk(b"IDAT", stream[:cut]),
        png_chunk(b"IDAT", stream[cut:]),
        png_chunk(b"IEND", b""),
    ])  # fmt: skip


def pillow_rgb(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(_to_rgb(img))


@pytest.mark.parametrize("colour", [0, 4, 2, 6], ids=list(MODES.values()))
def test_every_filter_decodes_to_the_pixels_and_to_pillows_rgb(rng, colour):
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    pixels = rng.integers(0, 256, (h, w, len(MODES[colour])), dtype=np.uint8)
    if colour in (4, 6):
        pixels[..., -1] = rng.choice([0, 1, 128, 254, 255], size=(h, w))  # edge alphas included
    data = encode(pixels, colour, rng)
    decoded, kind = _png.decode(data, 10**6)
    assert kind == colour
    np.testing.assert_array_equal(decoded, pixels)
    img, size = decode_image(data, 10**6)
    assert size == (w, h) and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), pillow_rgb(data))  # the same bytes as Pillow's path


def test_pillows_own_pngs_decode_alike(rng):
    for mode in MODES.values():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (33, 47, len(mode)), dtype=np.uint8).squeeze(), mode).save(
            buf, "PNG"
        )
        assert _png.decode(buf.getvalue(), 10**6) is not None
        np.testing.assert_array_equal(
            np.asarray(decode_image(buf.getvalue(), 10**6)[0]), pillow_rgb(buf.getvalue())
        )


def _pillow_png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_other_pngs_are_left_to_pillow(rng):
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    cases = {
        "palette": _pillow_png(rgb.convert("P")),
        "16-bit": _pillow_png(Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))),
        "transparency": _pillow_png(rgb, transparency=(0, 0, 0)),
        "exif": _pillow_png(rgb, exif=exif),
    }
    for name, data in cases.items():
        assert _png.decode(data, 10**6) is None, name
        img, size = decode_image(data, 10**6)
        assert size == (30, 20) and img.mode == "RGB"
        if name != "exif":
            np.testing.assert_array_equal(np.asarray(img), pillow_rgb(data))
    assert decode_image(cases["exif"], 10**6)[0].size == (20, 30)  # EXIF orientation honoured


def test_damaged_pngs_get_pillows_verdict(rng):
    good = encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), 2, rng)
    bad_crc = bytearray(good)
    bad_crc[-20] ^= 0xFF  # inside the last IDAT
    raw = zlib.compress(bytes([7]) + bytes(12) + bytes([0]) * 13 * 3)  # filter type 7 does not exist
    bad_filter = b"".join([
        PNG_SIGNATURE, png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)),
        png_chunk(b"IDAT", raw), png_chunk(b"IEND", b""),
    ])  # fmt: skip
    for data in (good[: len(good) // 2], bytes(bad_crc), bad_filter):
        assert _png.decode(data, 10**6) is None
        with pytest.raises(InputRejected) as fast:
            decode_image(data, 10**6)
        assert fast.value.reason == "decode_error"
    no_end = good[:-12]  # Pillow reads a file whose IEND chunk is missing
    assert _png.decode(no_end, 10**6) is None
    np.testing.assert_array_equal(np.asarray(decode_image(no_end, 10**6)[0]), pillow_rgb(good))


def test_size_limit_is_checked_before_inflating(rng, monkeypatch):
    data = encode(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), 2, rng)
    assert _png.decode(data, 30 * 40 - 1) is None
    with pytest.raises(InputRejected, match="too_large"):
        decode_image(data, 30 * 40 - 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30 * 40 - 1)  # Pillow's own limit holds as well
    with pytest.raises(InputRejected, match="too_large"):
        decode_image(data, 10**6)
