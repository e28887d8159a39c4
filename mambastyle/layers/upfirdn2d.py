"""Upsample, FIR-filter, downsample (``upfirdn2d``) in native PyTorch.

The operation, per channel and per spatial axis, is the one StyleGAN2 defines:

1. upsample by inserting ``up - 1`` zeros after every sample (length ``n * up``),
2. pad with ``pad0`` zeros before and ``pad1`` after (negative values crop),
3. convolve (true convolution, i.e. correlation with the flipped kernel) in
   "valid" mode,
4. keep every ``down``-th sample.

Output length per axis: ``(n * up + pad0 + pad1 - k) // down + 1``.

:func:`upfirdn2d` is the fast path used by the models. It never materialises the
zero-inserted tensor: upsampling is a strided transposed convolution, which
computes only the non-zero taps, and downsampling is a strided convolution.
:func:`upfirdn2d_ref` is the literal definition in float64 NumPy, kept as the
test oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Pad = tuple[int, int, int, int]  # (x0, x1, y0, y1)


def make_kernel(k: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Builds a normalised 2-D FIR kernel from 1-D taps (outer product) or a 2-D array."""
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    if k.ndim != 2:
        raise ValueError(f"FIR kernel must be 1-D or 2-D, got shape {tuple(k.shape)}")
    return k / k.sum()


def _normalise_pad(pad: int | Sequence[int]) -> Pad:
    """Accepts ``p``, ``(p0, p1)`` (same for both axes) or ``(x0, x1, y0, y1)``."""
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    if len(pad) == 4:
        return pad  # type: ignore[return-value]
    raise ValueError(f"pad must be an int, a pair or a 4-tuple, got {pad!r}")


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    """Returns (x, y) factors from an int or a pair; each must be >= 1."""
    vx, vy = (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
    if vx < 1 or vy < 1:
        raise ValueError(f"{name} factors must be >= 1, got {v!r}")
    return vx, vy


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int | Sequence[int] = 1,
    down: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Applies upsample -> pad -> FIR filter -> downsample to every channel of ``x``.

    Args:
        x: (B, C, H, W) input.
        kernel: (kh, kw) FIR kernel (already scaled, e.g. by ``up**2`` for upsampling).
        up: upsampling factor, an int or an (x, y) pair.
        down: downsampling factor, an int or an (x, y) pair.
        pad: padding applied after upsampling: ``p``, ``(p0, p1)`` or ``(x0, x1, y0, y1)``;
            negative values crop.

    Returns:
        (B, C, H', W') with ``H' = (H * up_y + y0 + y1 - kh) // down_y + 1`` (same for W).
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects (B, C, H, W), got shape {tuple(x.shape)}")
    if kernel.ndim != 2:
        raise ValueError(f"upfirdn2d expects a 2-D kernel, got shape {tuple(kernel.shape)}")
    upx, upy = _pair(up, "up")
    downx, downy = _pair(down, "down")
    px0, px1, py0, py1 = _normalise_pad(pad)
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    out_h = (h * upy + py0 + py1 - kh) // downy + 1
    out_w = (w * upx + px0 + px1 - kw) // downx + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d output would be empty ({out_h}x{out_w}) for input {h}x{w}")
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    xg = x.reshape(b * c, 1, h, w)

    if upx == 1 and upy == 1 and x.device.type == "cpu" and kh * kw <= 64:
        # On the CPU a single-channel convolution over B*C planes is slow, worst of all its
        # backward (oneDNN): for the small blur kernels a sum of shifted slices is faster both
        # ways (benchmarks/generator_forward.py), and two 1-D passes when it is separable.
        return _fir_slices(F.pad(x, [px0, px1, py0, py1]), kernel.flip([0, 1]), downy, downx, out_h, out_w)
    if upx == 1 and upy == 1:
        # Plain padded correlation with the flipped kernel; stride does the downsampling.
        xg = F.pad(xg, [px0, px1, py0, py1])
        weight = kernel.flip([0, 1])[None, None]
        out = F.conv2d(xg, weight, stride=(downy, downx))
    else:
        # The transposed convolution equals "zero-insert, then full convolution with the
        # kernel": full[o] = sum_i x[i] * k[o - up * i], length (n - 1) * up + k. The valid
        # output v of the definition above is full[v + k - 1 - pad0], so crop (or pad) the
        # full result by that offset on each side.
        full = F.conv_transpose2d(xg, kernel[None, None], stride=(upy, upx))
        fh, fw = full.shape[-2:]
        top, left = kh - 1 - py0, kw - 1 - px0
        span_h, span_w = out_h * downy - (downy - 1), out_w * downx - (downx - 1)
        bottom, right = fh - top - span_h, fw - left - span_w
        # F.pad with negative amounts crops; positive amounts add zeros.
        full = F.pad(full, [-left, -right, -top, -bottom])
        out = full[:, :, ::downy, ::downx]
    return out.reshape(b, c, out_h, out_w)


def _fir_slices(
    xp: torch.Tensor, weight: torch.Tensor, downy: int, downx: int, out_h: int, out_w: int
) -> torch.Tensor:
    """Valid correlation of padded ``xp`` (B, C, H, W) with ``weight`` (kh, kw), strided."""
    kh, kw = weight.shape
    span_h, span_w = (out_h - 1) * downy + 1, (out_w - 1) * downx + 1
    total = weight.sum()
    col, row = weight.sum(1), weight.sum(0)
    if total != 0 and torch.allclose(col[:, None] * row[None, :] / total, weight, rtol=1e-6, atol=1e-8):
        col = col / total  # weight == outer(col, row): vertical pass, then horizontal pass
        tmp = sum(col[a] * xp[:, :, a : a + span_h : downy, :] for a in range(kh))
        return sum(row[b] * tmp[:, :, :, b : b + span_w : downx] for b in range(kw))
    return sum(
        weight[a, b] * xp[:, :, a : a + span_h : downy, b : b + span_w : downx]
        for a in range(kh)
        for b in range(kw)
    )


def upfirdn2d_ref(
    x: np.ndarray,
    kernel: np.ndarray,
    up: int | Sequence[int] = 1,
    down: int | Sequence[int] = 1,
    pad: int | Sequence[int] = 0,
) -> np.ndarray:
    """Literal float64 definition of :func:`upfirdn2d` (slow; the test oracle)."""
    upx, upy = _pair(up, "up")
    downx, downy = _pair(down, "down")
    px0, px1, py0, py1 = _normalise_pad(pad)
    x = np.asarray(x, dtype=np.float64)
    k = np.asarray(kernel, dtype=np.float64)
    b, c, h, w = x.shape
    # 1. zero insertion
    u = np.zeros((b, c, h * upy, w * upx))
    u[:, :, ::upy, ::upx] = x
    # 2. pad (positive) / crop (negative)
    u = np.pad(u, ((0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
    u = u[:, :, max(-py0, 0) : u.shape[2] - max(-py1, 0), max(-px0, 0) : u.shape[3] - max(-px1, 0)]
    # 3. valid true convolution: y[i, j] = sum_{a, b} u[i + a, j + b] * k[kh-1-a, kw-1-b]
    kh, kw = k.shape
    oh, ow = u.shape[2] - kh + 1, u.shape[3] - kw + 1
    y = np.zeros((b, c, oh, ow))
    for a in range(kh):
        for bb in range(kw):
            y += u[:, :, a : a + oh, bb : bb + ow] * k[kh - 1 - a, kw - 1 - bb]
    # 4. decimation
    return y[:, :, ::downy, ::downx]
