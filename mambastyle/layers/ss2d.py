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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.layers.selective_scan import (
    CHUNK,
    Backend,
    available_backends,
    needs_grad,
    resolve_backend,
    selective_scan,
)

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


def direction_order(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 4, C, L) per-direction tensors in row-major token order -> each in its direction's
    scan order (what :func:`cross_scan` does to a single shared tensor)."""
    b, k, c, length = t.shape
    rows = t[:, 0]
    cols = t[:, 1].reshape(b, c, h, w).transpose(2, 3).reshape(b, c, length)
    rev_rows = t[:, 2].flip(-1)
    rev_cols = t[:, 3].reshape(b, c, h, w).transpose(2, 3).reshape(b, c, length).flip(-1)
    return torch.stack([rows, cols, rev_rows, rev_cols], dim=1)


def token_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a (B, H, W, C) map of tokens -> (B, H, W, O).

    Where :func:`projects_as_convolution` says so it runs as a 1x1 convolution of the
    channels-last map: the same matrix product (float32 accumulation either way), by the
    library that runs the encoders' other convolutions.
    """
    if x.dim() != 4 or not projects_as_convolution(x.device.type, x.dtype):
        return F.linear(x, weight)
    return F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None]).permute(0, 2, 3, 1)


def projects_as_convolution(device_type: str, dtype: torch.dtype) -> bool:
    """Whether :func:`token_linear` runs as a 1x1 convolution for inputs of this device and dtype.

    - CPUs: always. oneDNN's convolution kernels use the full vector width of every x86 CPU,
      where the BLAS behind ``F.linear`` falls back to narrower code paths on some (2x slower
      in float32 on AMD's Zen CPUs).
    - CUDA GPUs, float32 outside autocast: when PyTorch lets convolutions use TF32 and not
      matmuls (its defaults). The projections then get the tensor cores and the precision the
      encoder's convolutions get (psp's all run that way), instead of plain float32 matmuls on
      the CUDA cores, several times slower for SS2D's largest products. Under autocast, or with
      TF32 set alike for both, ``F.linear`` stays.
    """
    if device_type == "cpu":
        return True
    if device_type != "cuda" or dtype != torch.float32 or torch.is_autocast_enabled("cuda"):
        return False
    cudnn = torch.backends.cudnn
    return cudnn.enabled and cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def _check_scan_shapes(x, A, h, w, **got) -> None:
    b, length, d = x.shape
    n = A.shape[-1] if A.dim() == 3 else -1
    r = got["dt_weight"].shape[-1] if "dt_weight" in got else 0
    shapes = {"A": (K_DIRECTIONS, d, n), "D": (K_DIRECTIONS, d), "dt_bias": (K_DIRECTIONS, d),
              "dts": (K_DIRECTIONS, d, b, length), "B": (b, K_DIRECTIONS, n, length),
              "C": (b, K_DIRECTIONS, n, length), "proj": (b, length, K_DIRECTIONS, r + 2 * n),
              "dt_weight": (K_DIRECTIONS, d, r)}  # fmt: skip
    got = {"A": A, **got}
    bad = [f"{name} {tuple(t.shape)} (expected {shapes[name]})" for name, t in got.items()
           if tuple(t.shape) != shapes[name]]  # fmt: skip
    if length != h * w or length == 0 or n < 1 or bad:
        why = "; ".join(bad or ["L != h * w"])
        raise ValueError(f"ss2d_scan: x {tuple(x.shape)} on a {h}x{w} grid; {why}")


def ss2d_scan(
    x: torch.Tensor,
    dts: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    h: int,
    w: int,
    backend: Backend = "auto",
) -> torch.Tensor:
    """The four-direction selective scan of SS2D, summed over directions.

    Args:
        x: (B, L, d) inputs, tokens in row-major order (L = h * w), channels last.
        dts: (4, d, B, L) raw step sizes per direction (softplus(dts + dt_bias) is applied).
        A: (4, d, N); B, C: (B, 4, N, L); D, dt_bias: (4, d).
        backend: ``cpu`` and ``triton`` run fused kernels that read each direction's tokens
            in place (no permuted copies); the others scan cross-scanned copies with
            :func:`selective_scan` and cross-merge the outputs.

    Returns:
        (B, L, d): sum over directions of each direction's scan output (+ D * x), float32
        on ``cpu`` and ``triton``.
    """
    _check_scan_shapes(x, A, h, w, dts=dts, B=B, C=C, D=D, dt_bias=dt_bias)
    b, length, d = x.shape
    k = K_DIRECTIONS
    name = resolve_backend(backend, x.device)
    if name == "cpu":
        bc = torch.cat([B, C], dim=2).permute(0, 3, 1, 2)  # (B, L, 4, 2N): each token's row
        return _SS2DScanCPU.apply(x, bc, dts, None, dt_bias, A, D.sum(0), h, w)
    skip = x * D.sum(0)  # every direction adds D_k * x
    if name == "triton":
        from mambastyle.layers.selective_scan import _triton_kernels

        kernels = _triton_kernels()
        if needs_grad(x, dts, A, B, C, D, dt_bias):
            return kernels.SS2DScan.apply(x, dts, dt_bias, A, B, C, h, w) + skip
        return kernels.ss2d_infer(x, dts, dt_bias, A, B, C, h, w) + skip
    xs = cross_scan(x.transpose(1, 2).reshape(b, d, h, w))  # (B, 4, d, L)
    ys = selective_scan(
        xs.reshape(b, k * d, length),
        direction_order(dts.permute(2, 0, 1, 3), h, w).reshape(b, k * d, length),
        A.reshape(k * d, -1),
        direction_order(B, h, w),
        direction_order(C, h, w),
        delta_bias=dt_bias.reshape(-1),
        delta_softplus=True,
        backend=backend,
    )
    return cross_merge(ys.view(b, k, d, length), h, w).transpose(1, 2) + skip


def ss2d_scan_projected(
    x: torch.Tensor,
    proj: torch.Tensor,
    dt_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    h: int,
    w: int,
    backend: Backend = "auto",
) -> torch.Tensor:
    """:func:`ss2d_scan` with the step sizes in low-rank form, as SS2D computes them.

    Args:
        x: (B, L, d) inputs, tokens in row-major order.
        proj: (B, L, 4, R + 2N): per token and direction, R step-size factors, then B, then C
            (one matmul of x with the stacked ``x_proj`` weights gives this layout).
        dt_weight: (4, d, R): direction k's raw step sizes are ``dt_weight[k] @ factors``.
        A, D, dt_bias: as in :func:`ss2d_scan`.

    On ``cpu`` the kernel forms each token's step sizes from the factors as it scans (in
    float32; the (4, d, B, L) step sizes never exist in memory) and bfloat16 inputs are read
    as they are. ``triton`` gets them
    materialised for :func:`ss2d_scan`, token-major in memory; ``cuda`` and
    ``ref`` form them in each direction's scan order for the scan of cross-scanned copies.
    """
    _check_scan_shapes(x, A, h, w, proj=proj, dt_weight=dt_weight, D=D, dt_bias=dt_bias)
    n = A.shape[-1]
    name = resolve_backend(backend, x.device)
    if name == "cpu":
        return _SS2DScanCPU.apply(x, proj, None, dt_weight, dt_bias, A, D.sum(0), h, w)
    b, length, d = x.shape
    rank = dt_weight.shape[-1]
    if name == "triton":
        # The stepping kernels (forward, and backward) read one token of every channel per step.
        dts, B, C = _triton_operands(dt_weight, proj, n, token_major=True)
        return ss2d_scan(x, dts, A, B, C, D, dt_bias, h, w, backend)
    # Scans of cross-scanned copies: the projections (R + 2N per token and direction, against
    # d channels) are put in each direction's order, and the step sizes are formed from them
    # in that order, straight into the (B, 4 d, L) layout the scan reads: no permuted copy of
    # the (4, d, B, L) step sizes, the largest tensor of the layer.
    ordered = direction_order(proj.permute(0, 2, 3, 1), h, w)  # (B, 4, R + 2N, L)
    dts = torch.matmul(dt_weight.to(proj.dtype), ordered[:, :, :rank])  # (B, 4, d, L)
    ys = selective_scan(
        cross_scan(x.transpose(1, 2).reshape(b, d, h, w)).view(b, K_DIRECTIONS * d, length),
        dts.view(b, K_DIRECTIONS * d, length),
        A.reshape(K_DIRECTIONS * d, n),
        ordered[:, :, rank : rank + n].contiguous(),
        ordered[:, :, rank + n :].contiguous(),
        delta_bias=dt_bias.reshape(-1),
        delta_softplus=True,
        backend=backend,
    )
    return cross_merge(ys.view(b, K_DIRECTIONS, d, length), h, w).transpose(1, 2) + x * D.sum(0)


def _step_sizes(dt_weight: torch.Tensor, proj: torch.Tensor, token_major: bool = False) -> torch.Tensor:
    """Raw step sizes (4, d, B, L) from their low-rank form: ``dt_weight`` (4, d, R) times the
    first R columns of ``proj`` (B, L, 4, >= R). ``token_major``: as a view of a (4, B, L, d)
    tensor (each token's channels adjacent in memory)."""
    low = proj[..., : dt_weight.shape[-1]]
    if token_major:
        return torch.einsum("kdr,blkr->kbld", dt_weight, low).permute(0, 3, 1, 2)
    return torch.einsum("kdr,blkr->kdbl", dt_weight, low)


def _kernel_array(t: torch.Tensor):
    """A tensor as the cpu kernels read it: float32, or bfloat16 as its int16 bits (no copy)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy()
    return t.float().contiguous().numpy()


class _SS2DScanCPU(torch.autograd.Function):
    """Fused four-direction scan on the compiled CPU kernels, with its own backward.

    Inputs: x (B, L, d); bc (B, L, 4, off + 2N) whose last 2N columns per direction are B
    and C; either raw step sizes ``dts`` (4, d, B, L) (off = 0) or their low-rank form
    ``dt_weight`` (4, d, R) times bc's first R columns; dt_bias (4, d); A (4, d, N);
    dsum (d,), the skip coefficient. x, bc and dts may be bfloat16; the output is float32.
    """

    @staticmethod
    def forward(ctx, x, bc, dts, dt_weight, bias, A, dsum, h, w):
        from mambastyle.layers.selective_scan import _cpu_kernels, _sync_threads

        kern = _cpu_kernels()
        _sync_threads()
        b, length, d = x.shape
        k, n = A.shape[0], A.shape[2]
        # Chunk states are only needed for the backward pass.
        chunk = CHUNK if any(ctx.needs_input_grad) else length
        y = torch.empty(b, length, d)
        ckpt = torch.empty(b, k, d, math.ceil(length / chunk), n)
        bias_k, A_k, dsum_k = (t.detach().float().contiguous().numpy() for t in (bias, A, dsum))
        if dt_weight is None:  # raw step sizes, read as they are
            steps, weight = _kernel_array(dts.detach()), np.zeros((k, d, 0), np.float32)
        else:  # formed token by token inside the kernel, in float32
            steps = np.zeros((1, 1, 1, 1), np.float32)
            weight = dt_weight.detach().float().contiguous().numpy()
        xk, bck = _kernel_array(x.detach()), _kernel_array(bc.detach())
        kern.ss2d_fwd(xk, steps, weight, dt_weight is not None, bias_k, A_k, bck, dsum_k, h, w, chunk,
                      y.numpy(), ckpt.numpy())  # fmt: skip
        ctx.save_for_backward(x, bc, dts, dt_weight, bias, A, dsum, ckpt)
        ctx.hw = (h, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        from mambastyle.layers.selective_scan import _cpu_kernels, _sync_threads

        kern = _cpu_kernels()
        _sync_threads()
        x, bc, dts, dt_weight, bias, A, dsum, ckpt = ctx.saved_tensors
        h, w = ctx.hw
        b, length, d = x.shape
        k, n = A.shape[0], A.shape[2]
        rank = 0 if dt_weight is None else dt_weight.shape[-1]
        x, bc, A, bias = x.float().contiguous(), bc.float(), A.float().contiguous(), bias.float().contiguous()
        dy = dy.float().contiguous()
        if dt_weight is None:
            dts = dts.float().contiguous()
        else:
            dts = _step_sizes(dt_weight.float(), bc).contiguous()
        Bm = bc[..., rank : rank + n].transpose(1, 2).contiguous()  # (B, 4, L, N)
        Cm = bc[..., rank + n :].transpose(1, 2).contiguous()
        parts = max(1, min(d, 2 * torch.get_num_threads() // b))
        dx, ddts = torch.empty_like(x), torch.empty_like(dts)
        dA = x.new_empty(b, k, d, n)
        dB = x.new_zeros(b, k, parts, length, n)
        dC = x.new_zeros(b, k, parts, length, n)
        kern.ss2d_bwd(dy.numpy(), x.numpy(), dts.numpy(), bias.numpy(), A.numpy(), Bm.numpy(), Cm.numpy(),
                      ckpt.numpy(), h, w, CHUNK, parts, dx.numpy(), ddts.numpy(), dA.numpy(), dB.numpy(),
                      dC.numpy())  # fmt: skip
        dbc = torch.cat([dB.sum(2), dC.sum(2)], dim=-1).transpose(1, 2)  # (B, L, 4, 2N)
        ddts_out = dweight = None
        if dt_weight is not None:
            dlow = torch.einsum("kdr,kdbl->blkr", dt_weight.float(), ddts)
            dbc = torch.cat([dlow, dbc], dim=-1)
            dweight = torch.einsum("kdbl,blkr->kdr", ddts, bc[..., :rank])
        else:
            ddts_out = ddts
        return (
            dx + dy * dsum.float(),
            dbc,
            ddts_out,
            dweight,
            ddts.sum((2, 3)),
            dA.sum(0),
            (dy * x).sum((0, 1)),
            None,
            None,
        )


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
        style_params: bool = False,
    ):
        super().__init__()
        d_inner = int(expand * d_model)
        rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)  # -> x, z
        if style_params:  # stored by MambaStyle's published blocks, never read when inverting
            self.in_style_proj = nn.Linear(d_model, d_inner, bias=False)
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
        x, z = token_linear(x, self.in_proj.weight).chunk(2, dim=-1)  # (B, H, W, d) each
        x = x.permute(0, 3, 1, 2)  # (B, d, H, W)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = F.silu(x).permute(0, 2, 3, 1).reshape(b, h * w, d)  # (B, L, d), row-major tokens
        # Projections are per token, so they are computed once in row-major order (one matmul
        # for all four directions); the scan visits the tokens in each direction's order.
        weight = self.x_proj_weight.view(k * (r + 2 * n), d)
        proj = token_linear(x.view(b, h, w, d), weight).reshape(b, h * w, k, r + 2 * n)
        A = -torch.exp(self.A_logs.float()).view(k, d, n)
        D, dt_bias = self.Ds.float().view(k, d), self.dt_projs_bias.float()
        if self._fused_gate(x, proj, z):
            # Inference on `triton`: the four directions' outputs go straight through the
            # LayerNorm and the gate in one kernel.
            gated = _triton_gated(x, proj, self.dt_projs_weight, A, D, dt_bias, h, w, self.out_norm, z)
            return token_linear(gated.view(b, h, w, d), self.out_proj.weight)
        y = ss2d_scan_projected(
            x, proj, self.dt_projs_weight, A, D, dt_bias, h, w, backend=self.scan_backend
        )  # (B, L, d), summed over directions
        # The gate in z's precision: under bfloat16 autocast the product would otherwise be
        # formed in float32 (LayerNorm's output) only to be cast back for out_proj.
        y = self.out_norm(y.view(b, h, w, d)).to(z.dtype)
        return token_linear(y * F.silu(z), self.out_proj.weight)

    def _fused_gate(self, x: torch.Tensor, proj: torch.Tensor, z: torch.Tensor) -> bool:
        """Whether the scan, the output LayerNorm and the gate run fused: on the `triton`
        backend, without gradients, with an affine LayerNorm."""
        norm = self.out_norm
        return (
            resolve_backend(self.scan_backend, x.device) == "triton"
            and _affine_layer_norm(norm)
            and not needs_grad(
                x,
                proj,
                z,
                self.dt_projs_weight,
                self.A_logs,
                self.Ds,
                self.dt_projs_bias,
                norm.weight,
                norm.bias,
            )
        )


def _affine_layer_norm(m: nn.Module) -> bool:
    """Whether ``m`` is a plain ``nn.LayerNorm`` with weight and bias, as the Triton norm
    kernels compute it."""
    return type(m) is nn.LayerNorm and m.weight is not None and m.bias is not None


def _triton_gated(x, proj, dt_weight, A, D, dt_bias, h: int, w: int, norm: nn.LayerNorm, z) -> torch.Tensor:
    """norm(ss2d_scan_projected(...)) * silu(z) on the `triton` backend without gradients,
    (B, L, d) in z's dtype (see :func:`mambastyle.layers._scan_triton.ss2d_infer_gated`)."""
    from mambastyle.layers.selective_scan import _triton_kernels

    _check_scan_shapes(x, A, h, w, proj=proj, dt_weight=dt_weight, D=D, dt_bias=dt_bias)
    dts, B, C = _triton_operands(dt_weight, proj, A.shape[-1], token_major=True)
    return _triton_kernels().ss2d_infer_gated(
        x, dts, dt_bias, A, B, C, h, w, D.sum(0), norm.weight, norm.bias, norm.eps, z
    )


def _triton_operands(dt_weight, proj, n: int, token_major: bool):
    """Step sizes (4, d, B, L) and B, C (B, 4, N, L) for the `triton` SS2D kernels from the
    projections: step sizes token-major in memory for the stepping kernel (``token_major``),
    B and C as views of proj's rows (the training kernels take contiguous copies themselves)."""
    dts = _step_sizes(dt_weight.to(proj.dtype), proj, token_major)
    bc = proj[..., dt_weight.shape[-1] :].permute(0, 2, 3, 1)  # (B, 4, 2N, L)
    return dts, bc[:, :, :n], bc[:, :, n:]


class VSSBlock(nn.Module):
    """Pre-norm SS2D with a learned per-channel residual scale, then an output LayerNorm.

    Module names follow MambaStyle's published block (``self_attention``, ``norm``);
    ``style_params`` adds the two parameters that block stores for style transfer and that
    inversion never reads (``skip_scale2`` here, ``in_style_proj`` in the SS2D).
    """

    def __init__(self, dim: int, style_params: bool = False, **ss2d_kwargs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, style_params=style_params, **ss2d_kwargs)
        self.skip_scale = nn.Parameter(torch.ones(dim))
        if style_params:
            self.skip_scale2 = nn.Parameter(torch.ones(dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if self._fused_norms(x):
            return self._forward_fused(x)
        return self.norm(x * self.skip_scale + self.self_attention(self.ln_1(x)))

    def _fused_norms(self, x: torch.Tensor) -> bool:
        """Whether the LayerNorms run as Triton passes (see :meth:`_forward_fused`): on GPUs with
        Triton (whichever scan backend), or where the SS2D runs on `triton`; without gradients."""
        norms = (self.ln_1, self.norm)
        triton_here = x.device.type == "cuda" and "triton" in available_backends(x.device)
        return (
            (triton_here or resolve_backend(self.self_attention.scan_backend, x.device) == "triton")
            and all(_affine_layer_norm(m) for m in norms)
            and not needs_grad(x, *self.parameters())  # the Triton passes have no backward
        )

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The block with each LayerNorm one pass over its rows: ``ln_1`` writes the dtype its
        only reader, ``in_proj``, takes (autocast's, where autocast would have made it float32
        and the matmul cast it back), and the residual ``x * skip_scale + ssm`` is formed inside
        the output norm, in float32, never stored. Each norm's result has the dtype
        ``nn.LayerNorm`` gives its input (float32 under autocast)."""
        from mambastyle.layers.selective_scan import _triton_kernels

        kernels = _triton_kernels()
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        ln1, norm = self.ln_1, self.norm
        inner = torch.get_autocast_dtype(device) if autocast else x.dtype
        ssm = self.self_attention(kernels.scaled_add_norm(x, ln1.weight, ln1.bias, ln1.eps, inner))
        if autocast:  # LayerNorm's output is float32 under autocast
            dtype = torch.float32
        else:  # the residual's dtype, which LayerNorm keeps
            dtype = torch.promote_types(torch.promote_types(x.dtype, self.skip_scale.dtype), ssm.dtype)
        return kernels.scaled_add_norm(
            x, norm.weight, norm.bias, norm.eps, dtype, scale=self.skip_scale, residual=ssm
        )


def scan_backends(model: nn.Module, device: torch.device | str) -> list[str]:
    """The scan backends ``model``'s SS2D layers run on ``device`` (empty for models without
    any), as they resolve their ``scan_backend`` setting there."""
    return sorted({resolve_backend(m.scan_backend, device) for m in model.modules() if isinstance(m, SS2D)})


def describe_scan(model: nn.Module, device: torch.device | str) -> str:
    """One line for a worker's log: which scan backend runs where."""
    found = scan_backends(model, device)
    return f"scan backend {', '.join(found)} on {device}" if found else f"no selective scan (on {device})"
