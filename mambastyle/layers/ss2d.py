"""2-D selective scan (SS2D) and the vision state-space (VSS) block.

An image-shaped feature map is read as four 1-D sequences (row-major, column-major, and
both reversed), each direction gets its own input-dependent step size and B/C
projections, the four selective scans run as one grouped scan, and the outputs are
folded back onto the grid and summed (cross-merge). Shapes: B batch, H x W grid,
L = H * W tokens, C model width, d inner width (expand * C), K = 4 directions,
N state size, R step-size rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.layers.selective_scan import Backend, selective_scan

K_DIRECTIONS = 4


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, L): row-major, column-major, and each reversed."""
    b, c, h, w = x.shape
    rows = x.reshape(b, c, h * w)
    cols = x.transpose(2, 3).reshape(b, c, h * w)
    xs = torch.stack([rows, cols], dim=1)  # (B, 2, C, L)
    return torch.cat([xs, xs.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 4, C, L) -> (B, C, L): undoes each direction's ordering and sums (adjoint of cross_scan)."""
    b, k, c, length = ys.shape
    if k != K_DIRECTIONS or length != h * w:
        raise ValueError(f"expected (B, 4, C, {h * w}), got {tuple(ys.shape)}")
    ys = ys[:, :2] + ys[:, 2:].flip(-1)  # (B, 2, C, L) in row- and column-major order
    cols = ys[:, 1].reshape(b, c, w, h).transpose(2, 3).reshape(b, c, length)
    return ys[:, 0] + cols


class SS2D(nn.Module):
    """Four-direction selective scan over a (B, H, W, C) feature map, gated, with in/out projections.

    Initialisation follows Mamba: step sizes log-uniform in [dt_min, dt_max] (through the
    softplus bias), S4D-real ``A = -(1..N)``, ``D = 1``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int | None = None,
        d_conv: int = 3,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: Backend = "auto",
    ):
        super().__init__()
        d_inner = int(expand * d_model)
        rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)  # -> x, z
        self.conv2d = (
            nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner)
            if d_conv > 1
            else None
        )
        # Per direction: x -> (dt_rank + 2N) and dt_rank -> d_inner step sizes.
        bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(K_DIRECTIONS, rank + 2 * d_state, d_inner).uniform_(-bound, bound)
        )
        self.dt_projs_weight = nn.Parameter(
            torch.empty(K_DIRECTIONS, d_inner, rank).uniform_(-(rank**-0.5), rank**-0.5)
        )
        dt = torch.exp(
            torch.rand(K_DIRECTIONS, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(K_DIRECTIONS * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))  # (K * d, N)
        self.Ds = nn.Parameter(torch.ones(K_DIRECTIONS * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        k, d, n, r = K_DIRECTIONS, self.d_inner, self.d_state, self.dt_rank
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, d) each
        x = x.permute(0, 3, 1, 2)  # (B, d, H, W)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = F.silu(x)
        xs = cross_scan(x)  # (B, K, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, K, R + 2N, L)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, d, L)
        ys = selective_scan(
            xs.reshape(b, k * d, h * w),
            dts.reshape(b, k * d, h * w),
            -torch.exp(self.A_logs.float()),  # (K * d, N)
            bs.contiguous(),  # (B, K, N, L): one group per direction
            cs.contiguous(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )  # (B, K * d, L)
        y = cross_merge(ys.view(b, k, d, h * w), h, w)  # (B, d, L)
        y = self.out_norm(y.transpose(1, 2).reshape(b, h, w, d))
        return self.out_proj(y * F.silu(z))


class VSSBlock(nn.Module):
    """Pre-norm SS2D with a learned per-channel residual scale, then an output LayerNorm."""

    def __init__(self, dim: int, **ss2d_kwargs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, **ss2d_kwargs)
        self.skip_scale = nn.Parameter(torch.ones(dim))
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return self.ln_out(x * self.skip_scale + self.ss2d(self.ln_1(x)))
