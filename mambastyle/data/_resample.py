"""Compiled CPU kernels for face alignment (numba; compiled on first call, cached on disk).

Only :mod:`mambastyle.data.align` imports this module, when it first aligns a face.

The FFHQ recipe samples the face's quad bilinearly on a grid finer than the output, then
downsamples that grid with a Lanczos filter. Here the grid is exactly twice the output
(``SUPERSAMPLE``), so the downsampling is a fixed 12-tap filter applied along columns,
then rows, with no per-pixel weights. The grid carries ``MARGIN`` extra samples on every
side, real image content under the filter's reach, so no edge case exists. Sampling and
filtering work on one float32 plane per channel, so that their inner loops read and write
contiguous runs.

Only NaN/Inf/sign-of-zero assumptions are relaxed (no reassociation, no fused
multiply-add): the results are those of plain IEEE float32 arithmetic in source order, so
the same input gives the same bytes on any CPU.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np

SUPERSAMPLE = 2
TAPS = 12  # Lanczos-3 widened by the factor of 2
MARGIN = TAPS // 2 - 1  # output pixel i is centred on grid samples MARGIN + 2i and MARGIN + 2i + 1
FASTMATH = {"nnan", "ninf", "nsz"}


@nb.njit(inline="always", fastmath=FASTMATH)
def _round_u8(v):  # pragma: no cover - compiled
    """A float32 value as uint8: rounded half up, clipped to 0..255."""
    return np.uint8(min(max(v + np.float32(0.5), 0.0), 255.0))


@functools.cache
def lanczos_taps() -> np.ndarray:
    """Weights of Lanczos-3 for an exact 2x decimation: output i averages grid 2i .. 2i + 11
    (computed once; not to be modified)."""
    x = (np.arange(TAPS) - (TAPS - 1) / 2.0) / SUPERSAMPLE
    w = np.sinc(x) * np.sinc(x / 3.0)
    return (w / w.sum()).astype(np.float32)


@nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=FASTMATH)
def planes(src):  # pragma: no cover - compiled
    """(H, W, 3) uint8 -> (3, H * W) float32: one contiguous plane per channel."""
    h, w, _ = src.shape
    flat = src.reshape(-1)
    out = np.empty((3, h * w), np.float32)
    for c in range(3):
        for p in range(h * w):
            out[c, p] = flat[3 * p + c]
    return out


@nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=FASTMATH)
def warp_bilinear(src, h, w, m, gh, gw, margin):  # pragma: no cover - compiled
    """Samples an (h, w) image given as ``planes`` bilinearly on a (gh, gw) grid: (3, gh, gw) float32.

    Grid sample (i, j) sits at corner coordinates (j - margin + 0.5, i - margin + 0.5) of a
    plane mapped into the image by the affine ``m`` = (a, b, c, d, e, f): x = a u + b v + c,
    y = d u + e v + f (corner coordinates: pixel (r, s) covers [s, s + 1) x [r, r + 1)).
    Positions outside the image take the nearest edge value. Each grid row first finds its
    samples' source pixels and weights, then reads every channel's plane with them.
    """
    out = np.empty((3, gh, gw), np.float32)
    a, b, c, d, e, f = m[0], m[1], m[2], m[3], m[4], m[5]
    xmax, ymax = w - 1.0, h - 1.0
    index = np.empty(gw, np.int64)
    right = np.empty(gw, np.int64)
    down = np.empty(gw, np.int64)
    fx = np.empty(gw, np.float32)
    fy = np.empty(gw, np.float32)
    for i in range(gh):
        v = i - margin + 0.5
        x_row = b * v + c - 0.5  # -0.5: from corner coordinates to pixel centres
        y_row = e * v + f - 0.5
        for j in range(gw):
            u = j - margin + 0.5
            x = min(max(a * u + x_row, 0.0), xmax)
            y = min(max(d * u + y_row, 0.0), ymax)
            x0, y0 = int(x), int(y)
            fx[j], fy[j] = x - x0, y - y0
            index[j] = y0 * w + x0
            right[j] = 1 if x0 < w - 1 else 0
            down[j] = w if y0 < h - 1 else 0
        for k in range(3):
            plane = src[k]
            row = out[k, i]
            for j in range(gw):
                p = index[j]
                p00, p01 = plane[p], plane[p + right[j]]
                p10, p11 = plane[p + down[j]], plane[p + down[j] + right[j]]
                top = p00 + (p01 - p00) * fx[j]
                bottom = p10 + (p11 - p10) * fx[j]
                row[j] = top + (bottom - top) * fy[j]
    return out


@nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=FASTMATH)
def decimate2(grid, taps, n):  # pragma: no cover - compiled
    """(3, 2n + TAPS - 2, same) float32 grid -> (n, n, 3) uint8, filtering by ``taps`` per axis."""
    _, g, _ = grid.shape
    out = np.empty((n, n, 3), np.uint8)
    column = np.empty(g, np.float32)
    half = g // 2
    even = np.empty(half, np.float32)
    odd = np.empty(half, np.float32)
    acc = np.empty(n, np.float32)
    for k in range(3):
        plane = grid[k]
        for i in range(n):
            column[:] = 0.0
            for t in range(taps.shape[0]):  # along columns: grid rows 2i .. 2i + TAPS - 1
                wt = taps[t]
                src = plane[2 * i + t]
                for j in range(g):
                    column[j] += wt * src[j]
            for p in range(half):  # even and odd grid columns apart: every tap reads contiguously
                even[p] = column[2 * p]
                odd[p] = column[2 * p + 1]
            acc[:] = 0.0
            for t in range(taps.shape[0]):  # along the row
                wt = taps[t]
                phase = even if t % 2 == 0 else odd
                off = t // 2
                for j in range(n):
                    acc[j] += wt * phase[off + j]
            for j in range(n):
                out[i, j, k] = _round_u8(acc[j])
    return out


@nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=FASTMATH)
def interleave_u8(grid):  # pragma: no cover - compiled
    """(3, H, W) float32 -> (H, W, 3) uint8, rounded half up and clipped to 0..255."""
    _, h, w = grid.shape
    out = np.empty((h, w, 3), np.uint8)
    for i in range(h):
        for j in range(w):
            for k in range(3):
                out[i, j, k] = _round_u8(grid[k, i, j])
    return out


@nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def gather_reduce(src, rows, cols, k):  # pragma: no cover - compiled
    """The mean of each k x k block of ``src[rows][:, cols]`` (of its pixels inside at the bottom
    and right edges), rounded: an (H, W, 3) uint8 array reduced to (ceil(H / k), ceil(W / k), 3)
    without building the gathered array."""
    oh, ow = (len(rows) + k - 1) // k, (len(cols) + k - 1) // k
    out = np.empty((oh, ow, 3), np.uint8)
    acc = np.empty((ow, 3), np.int64)
    for oi in range(oh):
        acc[:] = 0
        r0, r1 = oi * k, min(oi * k + k, len(rows))
        for r in range(r0, r1):
            row = rows[r]
            for s in range(len(cols)):
                col = cols[s]
                for c in range(3):
                    acc[s // k, c] += src[row, col, c]
        for oj in range(ow):
            count = (r1 - r0) * (min(oj * k + k, len(cols)) - oj * k)
            for c in range(3):
                out[oi, oj, c] = (acc[oj, c] * 2 + count) // (2 * count)
    return out


@nb.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=FASTMATH)
def fill_padding(src, rows, cols, blurred, k, oy, ox, y0, x0, pad, ph, pw, median):  # pragma: no cover
    """The window ``src[rows][:, cols]`` of a reflection-padded image, faded into blur and median.

    Window pixel (i, j) is pixel (y0 + i, x0 + j) of the padded image, whose size is (ph, pw)
    and whose padding is ``pad`` = (left, top, right, bottom). ``blurred`` is the blurred
    padded image reduced by ``k``, starting at padded pixel (y0 - oy, x0 - ox). With m the
    fraction of the way into the padding (negative inside the photo), a pixel moves towards
    the blur by clip(3m + 1, 0, 1), then towards the median colour by clip(m, 0, 1).
    """
    h, w = len(rows), len(cols)
    bh, bw, _ = blurred.shape
    out = np.empty((h, w, 3), np.uint8)
    p0, p1 = max(pad[0], 1.0), max(pad[1], 1.0)
    p2, p3 = max(pad[2], 1.0), max(pad[3], 1.0)
    mx = np.empty(w)
    bx0 = np.empty(w, np.int64)
    bx1 = np.empty(w, np.int64)
    fx = np.empty(w, np.float32)
    for j in range(w):
        x = x0 + j
        mx[j] = 1.0 - min(x / p0, (pw - 1 - x) / p2)
        bx = min(max((j + ox + 0.5) / k - 0.5, 0.0), bw - 1.0)
        bx0[j] = int(bx)
        bx1[j] = min(bx0[j] + 1, bw - 1)
        fx[j] = bx - bx0[j]
    for i in range(h):
        y = y0 + i
        my = 1.0 - min(y / p1, (ph - 1 - y) / p3)
        by = min(max((i + oy + 0.5) / k - 0.5, 0.0), bh - 1.0)
        by0 = int(by)
        by1 = min(by0 + 1, bh - 1)
        fy = np.float32(by - by0)
        for j in range(w):
            m = max(mx[j], my)
            if m <= -1.0 / 3.0:  # inside the photo, away from the padding: the pixel as it is
                for c in range(3):
                    out[i, j, c] = src[rows[i], cols[j], c]
                continue
            to_blur = np.float32(min(max(3.0 * m + 1.0, 0.0), 1.0))
            to_median = np.float32(min(max(m, 0.0), 1.0))
            for c in range(3):
                b00, b01 = blurred[by0, bx0[j], c], blurred[by0, bx1[j], c]
                b10, b11 = blurred[by1, bx0[j], c], blurred[by1, bx1[j], c]
                top = b00 + (b01 - b00) * fx[j]
                bottom = b10 + (b11 - b10) * fx[j]
                v = np.float32(src[rows[i], cols[j], c])
                v += (top + (bottom - top) * fy - v) * to_blur
                v += (median[c] - v) * to_median
                out[i, j, c] = _round_u8(v)
    return out
