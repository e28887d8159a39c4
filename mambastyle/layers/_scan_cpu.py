"""Compiled CPU kernels for the selective scan (numba; compiled on first call, cached on disk).

Only :mod:`mambastyle.layers.selective_scan` imports this module, and only when the
``cpu`` backend first runs, so ``import mambastyle`` never pays for numba.

Recurrence per batch b, channel d (group g = d // (D / G)) and state n:

    a_t = exp(delta_t * A[d, n])                       (0 < a_t <= 1 for A <= 0)
    h_t = a_t * h_{t-1} + delta_t * u_t * B[b, g, t, n]
    y_t = sum_n C[b, g, t, n] * h_t

The forward pass keeps only the state at the start of every chunk of ``T`` steps
(``ckpt``); the backward pass recomputes each chunk's states from it, then runs the
adjoint recurrence in reverse: dh_{t-1} = a_t * (dh_t + C_t * dy_t). Nothing of size
(L, N) per channel is ever stored, so memory stays O(B * D * (L / T + 1) * N).
B and C come in time-major layout (Bt, G, L, N) so the inner loop over n is contiguous.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

CHANNEL_BLOCK = 8  # channels stepped through time together in the forward kernel

# Reassociation lets LLVM vectorise the loops over the state dimension (sums over n become
# SIMD reductions); NaN/Inf semantics are kept (no "nnan"/"ninf").
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@intrinsic
def _int_bits_as_float32(typingctx, i):
    """Reinterprets an int32's bits as a float32 (a free, vectorisable bitcast)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@nb.njit(inline="always", fastmath=FASTMATH)
def fast_exp(x):  # pragma: no cover - compiled
    """float32 exp(x) in plain arithmetic so that loops calling it vectorise.

    Cody-Waite range reduction x = k ln2 + r, a degree-7 polynomial for exp(r) (Cephes
    coefficients, max relative error ~1e-7), and 2^k assembled from exponent bits. Inputs
    are clamped to [-87.3, 88.3]: below, the result is ~1e-38 instead of a denormal.
    """
    x = min(max(x, np.float32(-87.3)), np.float32(88.3))
    k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _int_bits_as_float32((np.int32(k) + np.int32(127)) << 23)


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def scan_fwd(u, delta, A, Bm, Cm, T, y, ckpt, last):  # pragma: no cover - compiled
    """u, delta: (Bt, D, L); A: (D, N); Bm, Cm: (Bt, G, L, N) -> y (Bt, D, L),
    ckpt (Bt, D, ceil(L / T), N) states entering each chunk, last (Bt, D, N).

    Channels of a group are processed in blocks of ``CHANNEL_BLOCK`` that step through
    time together, so each B/C row is read once per block rather than once per channel.
    """
    n_batch, n_chan, length = u.shape
    n_groups = Bm.shape[1]
    n_state = A.shape[1]
    per_group = n_chan // n_groups
    blocks = (per_group + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for task in nb.prange(n_batch * n_groups * blocks):
        b = task // (n_groups * blocks)
        rem = task - b * n_groups * blocks
        g = rem // blocks
        d0 = g * per_group + (rem - g * blocks) * CHANNEL_BLOCK
        nd = min(CHANNEL_BLOCK, (g + 1) * per_group - d0)
        h = np.zeros((CHANNEL_BLOCK, n_state), dtype=np.float32)
        for t in range(length):
            if t % T == 0:
                for j in range(nd):
                    ckpt[b, d0 + j, t // T, :] = h[j]
            for j in range(nd):
                d = d0 + j
                dt = delta[b, d, t]
                x = dt * u[b, d, t]
                acc = np.float32(0.0)
                for n in range(n_state):
                    hn = fast_exp(dt * A[d, n]) * h[j, n] + x * Bm[b, g, t, n]
                    h[j, n] = hn
                    acc += Cm[b, g, t, n] * hn
                y[b, d, t] = acc
        for j in range(nd):
            last[b, d0 + j, :] = h[j]


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def scan_bwd(dy, dlast, u, delta, A, Bm, Cm, ckpt, T, parts, du, ddelta, dA, dB, dC):  # pragma: no cover
    """Gradients of :func:`scan_fwd`.

    Work is split into tasks (b, g, part): each owns a slice of the group's channels and
    accumulates dB/dC into its own (L, N) slab ``dB[b, g, part]``, so no two threads
    write the same memory. The caller sums the slabs over ``part`` and dA over ``b``.
    """
    n_batch, n_chan, length = u.shape
    n_groups = Bm.shape[1]
    n_state = A.shape[1]
    per_group = n_chan // n_groups
    per_part = (per_group + parts - 1) // parts
    n_chunks = ckpt.shape[2]
    for task in nb.prange(n_batch * n_groups * parts):
        b = task // (n_groups * parts)
        rem = task - b * n_groups * parts
        g = rem // parts
        p = rem - g * parts
        hs = np.empty((T + 1, n_state), dtype=np.float32)  # states within the chunk
        aa = np.empty((T, n_state), dtype=np.float32)  # decays within the chunk
        dh = np.empty(n_state, dtype=np.float32)
        dA_acc = np.empty(n_state, dtype=np.float64)
        d_start = g * per_group + p * per_part
        d_stop = min(d_start + per_part, (g + 1) * per_group)
        for d in range(d_start, d_stop):
            for n in range(n_state):
                dh[n] = dlast[b, d, n]
                dA_acc[n] = 0.0
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * T
                steps = min(T, length - t0)
                for n in range(n_state):
                    hs[0, n] = ckpt[b, d, c, n]
                for i in range(steps):  # recompute the chunk's states
                    t = t0 + i
                    dt = delta[b, d, t]
                    x = dt * u[b, d, t]
                    for n in range(n_state):
                        a = fast_exp(dt * A[d, n])
                        aa[i, n] = a
                        hs[i + 1, n] = a * hs[i, n] + x * Bm[b, g, t, n]
                for i in range(steps - 1, -1, -1):  # adjoint recurrence
                    t = t0 + i
                    dt = delta[b, d, t]
                    ut = u[b, d, t]
                    gy = dy[b, d, t]
                    dd = np.float32(0.0)
                    dx = np.float32(0.0)
                    for n in range(n_state):
                        dhn = dh[n] + Cm[b, g, t, n] * gy  # dL/dh_t
                        dC[b, g, p, t, n] += gy * hs[i + 1, n]
                        a = aa[i, n]
                        hp = hs[i, n]
                        bn = Bm[b, g, t, n]
                        dd += dhn * (A[d, n] * a * hp + ut * bn)
                        dA_acc[n] += dhn * dt * a * hp
                        dB[b, g, p, t, n] += dhn * dt * ut
                        dx += dhn * bn
                        dh[n] = dhn * a  # dL/dh_{t-1} (before adding its own output term)
                    du[b, d, t] = dx * dt
                    ddelta[b, d, t] = dd
            for n in range(n_state):
                dA[b, d, n] = dA_acc[n]
