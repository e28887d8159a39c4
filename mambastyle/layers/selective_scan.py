"""Selective scan (Mamba's S6 recurrence) with backends chosen at call time.

Same signature and semantics as mamba-ssm's ``selective_scan_fn``::

    delta <- softplus(delta + delta_bias)       (each step optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,   y <- y * silu(z)

Shapes: u, delta, z (Bt, D, L); A (D, N), real; B, C (Bt, N, L) or (Bt, G, N, L) with
channel d reading group d // (D / G) (SS2D passes one group per scan direction);
D, delta_bias (D,). Returns y (Bt, D, L) in u's dtype, and the last state (Bt, D, N)
when ``return_last_state``.

Backends:
- ``ref``: the recurrence step by step in PyTorch (float32, or float64 for float64
  inputs); exact, differentiable by autograd, the oracle the tests compare against.
- ``cpu``: compiled kernels (numba, compiled on first use and cached) with a hand-written
  backward that recomputes states per chunk: fast forward and backward on CPU with
  O(L / 64) state memory.
- ``triton``: Triton kernels (forward and backward, z, D, delta_bias and softplus fused in)
  for GPU tensors; Triton comes with torch's CUDA wheels, so this needs nothing else. With
  ``TRITON_INTERPRET=1`` set before the first call, the same kernels run in Triton's
  interpreter on CPU tensors (slowly: that is how they are tested without a GPU).
- ``cuda``: mamba-ssm's ``selective_scan_fn``; only when it imports and the tensors are
  on a GPU.
- ``auto`` (default): on a GPU ``cuda`` where mamba-ssm imports, else ``triton``; ``cpu``
  for CPU tensors; ``ref`` only where neither is possible.

Decays are exp(delta * A) with delta >= 0 and A <= 0 (S4D-real init), i.e. in (0, 1]:
no backend divides by a cumulative decay, so nothing overflows for any L or |A| * sum(dt).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "ref", "cpu", "triton", "cuda"]
BACKENDS = ("ref", "cpu", "triton", "cuda")
CHUNK = 64  # steps between stored states in the cpu backend

log = logging.getLogger(__name__)


@functools.cache
def _mamba_selective_scan_fn():
    """mamba-ssm's CUDA scan, or None when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, missing .so, triton errors, ABI mismatches
        log.debug("mamba-ssm selective scan unavailable: %s", exc)
        return None
    return selective_scan_fn


def _prefer_wide_vectors() -> None:
    """Lets numba's code use 512-bit vectors on AVX-512 CPUs.

    LLVM's tuning for recent Intel CPUs ("prefer-256-bit") halves the SIMD width of
    auto-vectorised loops; the scan kernels step 16 channels per vector and run about 1.5x
    faster without it. numba reads its CPU features once per process, when it first
    compiles or loads anything, so this runs before the kernels are imported. It changes
    nothing when NUMBA_CPU_NAME or NUMBA_CPU_FEATURES is set, or on CPUs without AVX-512.
    """
    import os

    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return
    import numba
    from numba.core.codegen import get_host_cpu_features

    features = get_host_cpu_features()
    if "+avx512f" in features.split(",") and "prefer-256-bit" not in features:
        numba.config.CPU_FEATURES = features + ",-prefer-256-bit"


@functools.cache
def _cpu_kernels():
    """The compiled CPU kernels, or None when numba is unavailable."""
    try:
        _prefer_wide_vectors()
        from mambastyle.layers import _scan_cpu
    except ImportError as exc:
        log.warning("numba is not importable (%s); the 'cpu' scan backend is unavailable", exc)
        return None
    return _scan_cpu


@functools.cache
def _triton_kernels():
    """The Triton kernels, or None when Triton cannot be imported. Whether they compile for
    the GPU or run in Triton's interpreter is fixed by TRITON_INTERPRET at the first call."""
    try:
        from mambastyle.layers import _scan_triton
    except Exception as exc:  # ImportError, or a Triton that does not match this torch
        log.debug("Triton scan kernels unavailable: %s", exc)
        return None
    return _scan_triton


def _triton_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment."""
    device = torch.device(device)
    out = ["ref"]
    if device.type == "cpu" and _cpu_kernels() is not None:
        out.append("cpu")
    on_gpu = device.type == "cuda" or (device.type == "cpu" and _triton_interpreting())
    if on_gpu and _triton_kernels() is not None:
        out.append("triton")
    if device.type == "cuda" and _mamba_selective_scan_fn() is not None:
        out.append("cuda")
    return out


def resolve_backend(backend: Backend, device: torch.device | str) -> str:
    """The concrete backend ``backend`` means for tensors on ``device`` (errors if unavailable)."""
    device = torch.device(device)
    if backend == "auto":
        avail = available_backends(device)
        # Triton's interpreter is a test harness, never a choice for CPU tensors.
        preference = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        return next((choice for choice in preference if choice in avail), "ref")
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    if backend != "ref" and backend not in available_backends(device):
        why = {
            "cpu": "needs CPU tensors and numba",
            "triton": "needs CUDA tensors and an importable Triton (torch's CUDA wheels bring it), "
            "or TRITON_INTERPRET=1 for CPU tensors",
            "cuda": "needs CUDA tensors and an importable mamba-ssm (pip install '.[cuda]')",
        }[backend]
        raise RuntimeError(f"scan backend {backend!r} is unavailable for {device.type} tensors: {why}")
    return backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: Backend = "auto",
):
    """Runs the selective scan; see the module docstring for shapes and semantics."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    if name == "cuda":
        return _mamba_selective_scan_fn()(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    if name == "triton":
        grouped = (B, C) if B.dim() == 4 else (B[:, None], C[:, None])
        scan = _triton_kernels().SelectiveScan
        save = needs_grad(u, delta, A, B, C, D, z, delta_bias)
        y, last = scan.apply(u, delta, A, *grouped, D, z, delta_bias, delta_softplus, save)
        return (y, last) if return_last_state else y
    dtype_in = u.dtype
    work = torch.float64 if dtype_in == torch.float64 and name == "ref" else torch.float32
    delta = delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:  # (Bt, N, L) -> one group
        B, C = B[:, None], C[:, None]
    u_w, A_w, B_w, C_w = u.to(work), A.to(work), B.to(work), C.to(work)
    if name == "ref":
        y, last = _scan_ref(u_w, delta, A_w, B_w, C_w)
    else:
        y, last = _CpuScan.apply(u_w, delta, A_w, B_w, C_w)
    if D is not None:
        y = y + u_w * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on ``tensors`` (grad mode on and one requires grad).
    Inside a custom Function's forward ``needs_input_grad`` cannot tell: it is set under
    ``torch.no_grad()`` too."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    bt, d, length = u.shape
    if A.is_complex():
        raise ValueError("complex A is not supported (SS2D uses real S4D A)")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be ({d}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        ok = (m.dim() == 3 and m.shape == (bt, n, length)) or (
            m.dim() == 4 and m.shape[0] == bt and m.shape[2:] == (n, length) and d % m.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"{name} must be ({bt}, {n}, {length}) or ({bt}, G, {n}, {length}) with G dividing {d}, "
                f"got {tuple(m.shape)}"
            )
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (d,):
            raise ValueError(f"{name} must be ({d},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must be {tuple(u.shape)}, got {tuple(z.shape)}")


def _scan_ref(u, delta, A, B, C):
    """The recurrence one step at a time (B, C grouped: (Bt, G, N, L)) -> y, last state.

    Steps are taken with ``unbind`` (views), so autograd's backward stays linear in L.
    """
    bt, d, length = u.shape
    g, n = B.shape[1], A.shape[1]
    h = u.new_zeros(bt, g, d // g, n)  # (Bt, G, D/G, N)
    A4 = A.view(1, g, d // g, n)
    ys = []
    for dt, ut, bt_, ct_ in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        dt4 = dt.view(bt, g, d // g, 1)  # (Bt, G, D/G, 1)
        h = torch.exp(dt4 * A4) * h + (dt4 * ut.view(bt, g, d // g, 1)) * bt_[:, :, None, :]
        ys.append((h * ct_[:, :, None, :]).sum(-1).view(bt, d))  # (Bt, D)
    return torch.stack(ys, dim=-1), h.reshape(bt, d, n)


class _CpuScan(torch.autograd.Function):
    """Core recurrence on the compiled CPU kernels (float32), with its own backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        k = _cpu_kernels()
        _sync_threads()
        bt, d, length = u.shape
        n = A.shape[1]
        u_c, dt_c, A_c = (t.detach().contiguous() for t in (u, delta, A))
        Bm = B.detach().transpose(-1, -2).contiguous()  # (Bt, G, L, N)
        Cm = C.detach().transpose(-1, -2).contiguous()
        y = u.new_empty(bt, d, length)
        ckpt = u.new_empty(bt, d, math.ceil(length / CHUNK), n)
        last = u.new_empty(bt, d, n)
        k.scan_fwd(u_c.numpy(), dt_c.numpy(), A_c.numpy(), Bm.numpy(), Cm.numpy(), CHUNK,
                   y.numpy(), ckpt.numpy(), last.numpy())  # fmt: skip
        ctx.save_for_backward(u_c, dt_c, A_c, Bm, Cm, ckpt)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        k = _cpu_kernels()
        _sync_threads()
        u, delta, A, Bm, Cm, ckpt = ctx.saved_tensors
        bt, d, length = u.shape
        g, n = Bm.shape[1], A.shape[1]
        dy = torch.zeros_like(u) if dy is None else dy.float().contiguous()
        dlast = u.new_zeros(bt, d, n) if dlast is None else dlast.float().contiguous()
        # Enough (b, g, part) tasks to keep every thread busy; parts never split a channel.
        parts = max(1, min(d // g, math.ceil(2 * torch.get_num_threads() / (bt * g))))
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = u.new_empty(bt, d, n)
        dB = u.new_zeros(bt, g, parts, length, n)
        dC = u.new_zeros(bt, g, parts, length, n)
        k.scan_bwd(dy.numpy(), dlast.numpy(), u.numpy(), delta.numpy(), A.numpy(), Bm.numpy(),
                   Cm.numpy(), ckpt.numpy(), CHUNK, parts, du.numpy(), ddelta.numpy(), dA.numpy(),
                   dB.numpy(), dC.numpy())  # fmt: skip
        return du, ddelta, dA.sum(0), dB.sum(2).transpose(-1, -2), dC.sum(2).transpose(-1, -2)


def _sync_threads() -> None:
    """Lets numba use as many threads as torch (e.g. 1 inside a Ray task with num_cpus=1).

    Numba's OpenMP threading layer, when it loads (on the first call here), sets the
    OpenMP thread count of the calling thread to all cores, and torch's intra-op pool is
    that same libgomp: torch's own setting is put back.
    """
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
