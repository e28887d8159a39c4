"""Triton kernels for the selective scan and the fused four-direction SS2D scan.

Only :mod:`mambastyle.layers.selective_scan` imports this module, on the first call of the
``triton`` backend, so ``import mambastyle`` never imports Triton. Triton decides when this
module is imported whether its kernels compile for the GPU or run in its interpreter
(``TRITON_INTERPRET=1``, CPU tensors), which is how the tests check them without a GPU.

The training kernels walk time in chunks of ``BLOCK_T`` steps: a program owns one batch
element and a block of ``BLOCK_D`` channels; within a chunk the recurrence
h_t = a_t h_{t-1} + x_t (a_t = exp(delta_t A), x_t = delta_t u_t B_t) is a parallel prefix
scan over the chunk's steps (``tl.associative_scan`` on (a, x) pairs) for all ``BLOCK_N``
states of every channel at once, and the state at the chunk's end carries into the next
chunk. Decays are in (0, 1] and nothing divides by a product of them.

- Selective scan (``CROSS=False``, ``K=1``): u, delta, z, y are (Bt, D, L); B, C are
  (Bt, G, N, L) and channel d reads group d // (D / G). softplus, delta_bias, D and the
  z gate are applied in the kernels, as mamba-ssm's kernel does.
- SS2D's chunked backward (``CROSS=True``, ``K=4``; ``SS2D_BACKWARD = "chunked"``, the
  alternative to the stepping one below): x and dx are (B, L, d) with tokens in row-major
  order and the step sizes (4, d, B, L); direction k reads tokens in its own order
  (row-major, column-major, both reversed) by index arithmetic, so the four scanned copies
  of the sequence never exist in memory. A program runs its channels' four directions one
  after the other and adds each into dx, so the sum over directions needs no atomics and is
  deterministic.

SS2D's forward, with or without gradients, takes another kernel, :func:`_ss2d_step`: a
program owns one batch element, one direction and ``BLOCK_D`` channels, one channel per
thread with all its N states in that thread's registers, and walks the tokens one step at a
time, in the same index arithmetic. The chunked scan spends several warp shuffles per state
update on its prefix scan; a step costs an exp2 and two multiply-adds per state and no
communication between threads, and the four directions run side by side (each into its own
slice of a (4, B, L, d) buffer, summed afterwards, so the result does not depend on the
order programs finish in; the buffer is the price: four times the output, 2 GiB of float32
at the encoder's 64x64 level at batch 32). Without gradients, the sum over directions,
SS2D's output LayerNorm and its gate then run as one pass (:func:`ss2d_infer_gated`), and
under bfloat16 autocast the buffer is bfloat16.

The forward pass stores the state at the start of every chunk when gradients are needed;
the backward pass recomputes each chunk's states from it and runs the adjoint recurrence
g_t = C_t dy_t + a_{t+1} g_{t+1} back through the chunk, chunk by chunk from the end: the
chunked kernels as a reverse prefix scan, SS2D's stepping backward (:func:`_ss2d_step_bwd`,
the default) token by token with a thread per channel, as its forward. Gradients of B and C
(summed over a group's channels) are accumulated with atomic adds across programs, as are
A's and D's in the chunked kernels; everything is float32 inside whatever the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Registers per program: BLOCK_D * BLOCK_N * BLOCK_T float32 values per live (a, x, h)
# tile; 4096 keeps a 4-warp program's tiles within its registers on current GPUs.
TILE_BUDGET = 4096
BLOCK_T = 32
# Tokens per iteration of the stepping kernel's loop (see _ss2d_step).
STEPS_PER_ITERATION = 2
# SS2D's backward kernel: "stepping" (_ss2d_step_bwd) or "chunked" (_scan_bwd).
SS2D_BACKWARD = "stepping"


@triton.jit
def _combine(a1, x1, a2, x2):
    """Composes two steps of h -> a h + x, the left one first."""
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _position(t, L, H, W, k: tl.constexpr, CROSS: tl.constexpr):
    """Row-major token index that direction ``k`` visits at step ``t``."""
    if CROSS:
        if k >= 2:
            t = L - 1 - t
        if k % 2 == 1:
            t = (t % H) * W + t // H
    return t


@triton.jit
def _softplus(raw):
    """log(1 + exp(raw)), float32, to a few units in the last place everywhere: max(raw, 0) +
    log1p(exp(-|raw|)), log1p(e) = 2 atanh(e / (2 + e)) by its odd series (|s| <= 1/3), as the
    cpu backend computes it. log(1 + exp(raw)) as written loses a small step size's digits
    where 1 + e rounds (6e-5 of a step size of 1e-3, more through an approximate log)."""
    e = tl.exp2(-tl.abs(raw) * 1.4426950408889634)
    s = tl.fdiv(e, 2.0 + e)
    s2 = s * s
    p = s2 * (1.0 / 13.0) + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return tl.maximum(raw, 0.0) + 2.0 * s * p


@triton.jit
def _step_sizes(dt_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Loads raw step sizes and applies bias and softplus; 0 outside ``mask`` (a no-op step).
    Returns (delta, raw + bias)."""
    raw = tl.load(dt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _chunk(
    u_ptr, dt_ptr, B_ptr, C_ptr, bias, b, c, n, t, grp, mc, mcn, L, H, W,
    su_b, su_d, su_l, sdt_k, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l,
    k: tl.constexpr, CROSS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Direction ``k``'s inputs at steps ``t`` for channels ``c``: token positions, mask, u
    offsets, u, step offsets, delta, raw step + bias, B/C offsets and mask, B, C; float32,
    zero (a no-op step) past L."""
    pos = _position(t, L, H, W, k, CROSS)
    m2 = mc[:, None] & (t < L)[None, :]
    uo = b * su_b + c[:, None] * su_d + pos[None, :] * su_l
    u = tl.load(u_ptr + uo, mask=m2, other=0.0).to(tl.float32)
    dto = k * sdt_k + b * sdt_b + c[:, None] * sdt_d + pos[None, :] * sdt_l
    dt, raw = _step_sizes(dt_ptr, dto, m2, bias, HAS_BIAS, SOFTPLUS)
    bo = b * sB_b + grp[:, None, None] * sB_g + n[None, :, None] * sB_n + pos[None, None, :] * sB_l
    m3 = mcn[:, :, None] & (t < L)[None, None, :]
    Bv = tl.load(B_ptr + bo, mask=m3, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bo, mask=m3, other=0.0).to(tl.float32)
    return pos, m2, uo, u, dto, dt, raw, bo, m3, Bv, Cv


@triton.jit
def _ckpt_offsets(b, k, ci, c, n, K: tl.constexpr, NS, N_CHUNKS, s_n):
    """Offsets of the (BLOCK_D, BLOCK_N) state entering chunk ``ci`` of direction ``k`` in the
    chunk states (Bt, K, N_CHUNKS, N, DK), ``s_n`` (= DK) apart per state: channels adjacent,
    so that the stepping kernel, whose threads run along channels, stores them from its own
    tile (it passes its alignment-exempt ``sA_n`` here, as for A)."""
    row = (b.to(tl.int64) * K + k) * N_CHUNKS + ci
    return (row * NS + n[None, :]) * s_n + c[:, None]


@triton.jit
def _states(dt, u, Bv, A, h0):
    """A chunk's states from the state ``h0`` before it: h_t = exp(delta_t A) h_{t-1} + x_t
    as a prefix scan over the chunk's steps. Returns (x, h), both (BLOCK_D, BLOCK_N, BLOCK_T)."""
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    x = (dt * u)[:, None, :] * Bv
    acum, hs = tl.associative_scan((a, x), 2, _combine)
    return x, acum * h0[:, :, None] + hs


@triton.jit
def _scan_fwd(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, y_ptr, ckpt_ptr, last_ptr,
    L, H, W, DK, CPG, NS, N_CHUNKS,
    su_b, su_d, su_l, sdt_k, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_CKPT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """The plain selective scan's forward (SS2D's steps through the tokens: :func:`_ss2d_step`)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_T)
    mc = c < DK
    mcn = mc[:, None] & (n < NS)[None, :]
    grp = c // CPG
    A = tl.load(A_ptr + c[:, None] * NS + n[None, :], mask=mcn, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=mc, other=0.0).to(tl.float32) if HAS_BIAS else None
    Dv = tl.load(D_ptr + c, mask=mc, other=0.0).to(tl.float32) if HAS_D else None
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for ci in range(N_CHUNKS):
        t = ci * BLOCK_T + j
        _, m2, uo, u, _, dt, _, _, _, Bv, Cv = _chunk(
            u_ptr, dt_ptr, B_ptr, C_ptr, bias, b, c, n, t, grp, mc, mcn, L, H, W,
            su_b, su_d, su_l, sdt_k, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l,
            0, False, HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
        if SAVE_CKPT:
            tl.store(ckpt_ptr + _ckpt_offsets(b, 0, ci, c, n, 1, NS, N_CHUNKS, DK), h, mask=mcn)
        _, hh = _states(dt, u, Bv, A, h)
        y = tl.sum(hh * Cv, axis=1)
        # Steps past L are no-ops (a = 1, x = 0): the last column is the last real state.
        h = tl.sum(tl.where((j == BLOCK_T - 1)[None, None, :], hh, 0.0), axis=2)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + uo, mask=m2, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + uo, y, mask=m2)
    tl.store(last_ptr + (b * DK + c[:, None]) * NS + n[None, :], h, mask=mcn)


@triton.jit
def _scan_bwd(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, dy_ptr, ckpt_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr,
    L, H, W, DK, CPG, NS, N_CHUNKS,
    su_b, su_d, su_l, sdt_k, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l,
    K: tl.constexpr, CROSS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_T)
    mc = c < DK
    mcn = mc[:, None] & (n < NS)[None, :]
    for k in tl.static_range(K):
        ch = k * DK + c
        grp = k * (DK // CPG) + c // CPG
        A = tl.load(A_ptr + ch[:, None] * NS + n[None, :], mask=mcn, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + ch, mask=mc, other=0.0).to(tl.float32) if HAS_BIAS else None
        Dv = tl.load(D_ptr + ch, mask=mc, other=0.0).to(tl.float32) if HAS_D else None
        so = (b * K * DK + ch[:, None]) * NS + n[None, :]
        if HAS_DLAST:
            g_next = tl.load(dlast_ptr + so, mask=mcn, other=0.0).to(tl.float32)
        else:
            g_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        dA = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        dD = tl.zeros((BLOCK_D,), tl.float32)
        for cc in range(N_CHUNKS):
            ci = N_CHUNKS - 1 - cc
            t = ci * BLOCK_T + j
            pos, m2, uo, u, dto, dt, raw, bo, m3, Bv, Cv = _chunk(
                u_ptr, dt_ptr, B_ptr, C_ptr, bias, b, c, n, t, grp, mc, mcn, L, H, W,
                su_b, su_d, su_l, sdt_k, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l,
                k, CROSS, HAS_BIAS, SOFTPLUS,
            )  # fmt: skip
            h0 = tl.load(ckpt_ptr + _ckpt_offsets(b, k, ci, c, n, K, NS, N_CHUNKS, DK), mask=mcn, other=0.0)
            x, hh = _states(dt, u, Bv, A, h0)
            dy = tl.load(dy_ptr + uo, mask=m2, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + uo, mask=m2, other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                y = tl.sum(hh * Cv, axis=1)
                if HAS_D:
                    y += Dv[:, None] * u
                tl.store(dz_ptr + uo, dy * y * sz * (1.0 + z * (1.0 - sz)), mask=m2)
                dy = dy * z * sz
            # Adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, a reverse scan over (a_{t+1}, C_t dy_t).
            t1 = t + 1
            m21 = mc[:, None] & (t1 < L)[None, :]
            pos1 = _position(t1, L, H, W, k, CROSS)
            dto1 = k * sdt_k + b * sdt_b + c[:, None] * sdt_d + pos1[None, :] * sdt_l
            dt1, _ = _step_sizes(dt_ptr, dto1, m21, bias, HAS_BIAS, SOFTPLUS)
            a1 = tl.exp(dt1[:, None, :] * A[:, :, None])
            gprod, gsum = tl.associative_scan((a1, Cv * dy[:, None, :]), 2, _combine, reverse=True)
            g = gsum + gprod * g_next[:, :, None]
            g_next = tl.sum(tl.where((j == 0)[None, None, :], g, 0.0), axis=2)
            decayed = hh - x  # a_t h_{t-1}
            ddt = tl.sum(g * (u[:, None, :] * Bv + A[:, :, None] * decayed), axis=1)
            dA += tl.sum(g * dt[:, None, :] * decayed, axis=2)
            du = tl.sum(g * Bv, axis=1) * dt
            if HAS_D:
                du += dy * Dv[:, None]
                dD += tl.sum(dy * u, axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            tl.store(ddt_ptr + dto, ddt, mask=m2)
            if k > 0:
                du += tl.load(du_ptr + uo, mask=m2, other=0.0)
            tl.store(du_ptr + uo, du, mask=m2)
            dBv = g * (dt * u)[:, None, :]
            dCv = hh * dy[:, None, :]
            if ONE_GROUP:  # every channel of the block reads the same group: reduce first
                go = b * sB_b + (k * (DK // CPG) + (tl.program_id(1) * BLOCK_D) // CPG) * sB_g
                o2 = go + n[:, None] * sB_n + pos[None, :] * sB_l
                m2n = (n < NS)[:, None] & (t < L)[None, :]
                tl.atomic_add(dB_ptr + o2, tl.sum(dBv, axis=0), mask=m2n, sem="relaxed")
                tl.atomic_add(dC_ptr + o2, tl.sum(dCv, axis=0), mask=m2n, sem="relaxed")
            else:
                tl.atomic_add(dB_ptr + bo, dBv, mask=m3, sem="relaxed")
                tl.atomic_add(dC_ptr + bo, dCv, mask=m3, sem="relaxed")
        tl.atomic_add(dA_ptr + ch[:, None] * NS + n[None, :], dA, mask=mcn, sem="relaxed")
        if HAS_D:
            tl.atomic_add(dD_ptr + ch, dD, mask=mc, sem="relaxed")
        if k + 1 < K:
            tl.debug_barrier()  # the next direction adds to the dx this one stored


@triton.jit
def _token_inputs(x_row, dt_row, b_row, c_row, pos, sx_l, sdt_l, s_l, mc, mn, EVEN_N: tl.constexpr):
    """Token ``pos``'s x and raw step sizes (BLOCK_D,) and B and C rows (BLOCK_N,), as stored."""
    u = tl.load(x_row + pos * sx_l, mask=mc, other=0.0)
    raw = tl.load(dt_row + pos * sdt_l, mask=mc, other=0.0)
    if EVEN_N:  # no mask: the rows load as whole vectors
        return u, raw, tl.load(b_row + pos * s_l), tl.load(c_row + pos * s_l)
    else:
        Bv = tl.load(b_row + pos * s_l, mask=mn, other=0.0)
        return u, raw, Bv, tl.load(c_row + pos * s_l, mask=mn, other=0.0)


@triton.jit
def _next_position(pos, step, wrap, L):
    """The token after ``pos`` in a direction's order (with ``step`` and ``wrap`` negated, the
    token before it), and a row to prefetch from (that token, or a valid row never used once
    the walk has left [0, L))."""
    nxt = pos + step
    nxt = tl.where((nxt < 0) | (nxt >= L), nxt + wrap, nxt)
    return nxt, tl.minimum(tl.maximum(nxt, 0), L - 1)


@triton.jit
def _walk(k, L, W):
    """Direction ``k``'s token order as steps: (first row, step, wrap). Rows (+1), columns (+W,
    wrapping to the next column's top by 1 - L), and both reversed; a row-major walk leaves
    [0, L) only after its last token."""
    step = tl.where(k == 0, 1, tl.where(k == 1, W, tl.where(k == 2, -1, -W)))
    wrap = tl.where(k == 1, 1 - L, tl.where(k == 3, L - 1, 0))
    return tl.where(k >= 2, L - 1, 0), step, wrap


@triton.jit
def _token_at(t, k, L, H, W):
    """Row of direction ``k``'s token ``t`` (a runtime ``k``; :func:`_position` takes a constant)."""
    t = tl.where(k >= 2, L - 1 - t, t)
    return tl.where(k % 2 == 1, (t % H) * W + t // H, t)


@triton.jit
def _channel_states(A_ptr, k, NS, sA_n, c, n, mc, mn):
    """Direction ``k``'s (BLOCK_D, BLOCK_N) tile of A, float32, read through A's (4, N, d)
    transpose, ``sA_n`` apart per state (see :func:`_ss2d_step` on the layout this gives)."""
    A = tl.load(A_ptr + (k * NS + n[None, :]) * sA_n + c[:, None], mask=mc[:, None] & mn[None, :], other=0.0)
    return A.to(tl.float32)


@triton.jit
def _bc_rows(bc_ptr, b, k, L, NS, n, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    """Pointers to the B and C halves of direction ``k``'s rows of bc (B, 4, L, 2N), and the
    rows' stride."""
    s_l = 2 * NS
    b_row = bc_ptr + (b * 4 + k) * L * s_l + n
    if EVEN_N:  # a constant offset: the two halves' loads share one address
        c_row = b_row + BLOCK_N
    else:
        c_row = b_row + NS
    return b_row, c_row, s_l


@triton.jit
def _decay(raw, bias, A):
    """A token's raw step sizes plus bias r, the step sizes delta = softplus(r) (BLOCK_D,) and
    the decays exp(delta A) (BLOCK_D, BLOCK_N), as exp2(delta log2(e) A): one multiply per
    state."""
    r = raw.to(tl.float32) + bias
    dt = _softplus(r)
    return r, dt, tl.exp2((dt * 1.4426950408889634)[:, None] * A)


@triton.jit
def _advance(h, u, raw, Bv, bias, A):
    """One token of the recurrence for a block of channels: h <- exp(delta A) h + delta u B."""
    _, dt, a = _decay(raw, bias, A)
    return a * h + (dt * u.to(tl.float32))[:, None] * Bv.to(tl.float32)[None, :]


@triton.jit
def _readout(h, Cv):
    """y = C . h per channel (BLOCK_D,): a thread's own adds over its states."""
    return tl.sum(h * Cv.to(tl.float32)[None, :], axis=1)


@triton.jit(do_not_specialize_on_alignment=["sA_n"])
def _ss2d_step(
    x_ptr, dt_ptr, A_ptr, bc_ptr, bias_ptr, y_ptr, ckpt_ptr,
    L, W, DK, NS, sA_n, N_CHUNKS,
    sx_b, sx_l, sdt_k, sdt_b, sdt_l, sdt_d, sy_k, sy_b, sy_l,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    SAVE_CKPT: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Direction ``program_id(2)``'s scan of SS2D for one batch element and BLOCK_D channels,
    one token per step: y[k, b, pos, c] = C_pos . h_pos (no D term), in y's dtype. With
    ``SAVE_CKPT`` it also stores the state entering every BLOCK_T steps of the direction, as
    the backward kernels read it (:func:`_ckpt_offsets`).

    Each thread owns whole channels: A is read through its (4, N, d) transpose (``sA_n``
    apart per state), so the tile's threads run along channels and a channel's N states sit
    in one thread's registers; the sum over states is then a thread's own adds, not warp
    shuffles. ``sA_n`` is exempt from Triton's divisibility specialisation: with it, the
    load of A would be vectorised along channels and spread the states over warps. A
    token's B and C are one contiguous float32 row of bc (B, 4, L, 2N) (:func:`_state_rows`):
    its loads share one address, where two tensors' rows took two register moves per vector
    load (``EVEN_N``: N is a power of two, no mask).

    Each loop iteration takes two tokens (``STEPS_PER_ITERATION``), and each token's inputs
    are loaded one step before they are used, so their latency overlaps the math. With two
    sets of input registers taking turns, a set is reloaded only once its token is done:
    a one-token loop carries the prefetched inputs into the next iteration through register
    copies (a sixth of its instructions). For an odd L the last iteration's second token is
    a row already seen: its output is not stored and the state after it is never read.
    """
    b = tl.program_id(0).to(tl.int64)  # offsets of big batches pass 2**31
    k = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mc = c < DK
    mn = n < NS
    A = _channel_states(A_ptr, k, NS, sA_n, c, n, mc, mn)
    bias = tl.load(bias_ptr + k * DK + c, mask=mc, other=0.0).to(tl.float32)
    pos, step, wrap = _walk(k, L, W)
    x_row = x_ptr + b * sx_b + c
    dt_row = dt_ptr + k.to(tl.int64) * sdt_k + b * sdt_b + c.to(tl.int64) * sdt_d  # d * B * L may pass 2**31
    b_row, c_row, s_l = _bc_rows(bc_ptr, b, k, L, NS, n, BLOCK_N, EVEN_N)
    y_row = y_ptr + k.to(tl.int64) * sy_k + b * sy_b + c
    u, raw, Bv, Cv = _token_inputs(x_row, dt_row, b_row, c_row, pos, sx_l, sdt_l, s_l, mc, mn, EVEN_N)
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for i in range(0, L, 2):
        if SAVE_CKPT:  # BLOCK_T is even: chunks start on the first of an iteration's tokens
            if i % BLOCK_T == 0:
                co = _ckpt_offsets(b, k, i // BLOCK_T, c, n, 4, NS, N_CHUNKS, sA_n)
                tl.store(ckpt_ptr + co, h, mask=mc[:, None] & mn[None, :])
        pos1, ahead = _next_position(pos, step, wrap, L)
        u1, raw1, B1, C1 = _token_inputs(x_row, dt_row, b_row, c_row, ahead, sx_l, sdt_l, s_l, mc, mn, EVEN_N)
        h = _advance(h, u, raw, Bv, bias, A)
        tl.store(y_row + pos * sy_l, _readout(h, Cv).to(y_ptr.dtype.element_ty), mask=mc)
        pos, ahead = _next_position(pos1, step, wrap, L)
        u, raw, Bv, Cv = _token_inputs(x_row, dt_row, b_row, c_row, ahead, sx_l, sdt_l, s_l, mc, mn, EVEN_N)
        h = _advance(h, u1, raw1, B1, bias, A)
        tl.store(y_row + pos1 * sy_l, _readout(h, C1).to(y_ptr.dtype.element_ty), mask=mc & (i + 1 < L))


@triton.jit
def _token_grads_inputs(
    x_row, dt_row, b_row, c_row, dy_row, hs_tile, pos, j, sx_l, sdt_l, s_l, s_j, mc, mn, EVEN_N: tl.constexpr
):  # fmt: skip
    """What the backward's walk reads for token ``pos``, the ``j``-th of its chunk: x, raw step
    sizes, B and C rows (as stored), dy (float32) and the state after the token."""
    u, raw, Bv, Cv = _token_inputs(x_row, dt_row, b_row, c_row, pos, sx_l, sdt_l, s_l, mc, mn, EVEN_N)
    dy = tl.load(dy_row + pos * sx_l, mask=mc, other=0.0).to(tl.float32)
    h = tl.load(hs_tile + j * s_j, mask=mc[:, None] & mn[None, :], other=0.0)
    return u, raw, Bv, Cv, dy, h


@triton.jit(do_not_specialize_on_alignment=["sA_n"])
def _ss2d_step_bwd(
    x_ptr, dt_ptr, A_ptr, bc_ptr, bias_ptr, dy_ptr, ckpt_ptr, hs_ptr,
    dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr,
    L, H, W, DK, NS, sA_n, N_CHUNKS,
    sx_b, sx_l, sdt_k, sdt_b, sdt_l, sdt_d, sg_k, sg_b, sg_l, sg_d, sB_b, sB_k, sB_n, sB_l,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """The backward pass of direction ``program_id(2)``'s scan for one batch element and
    BLOCK_D channels, one channel per thread as in :func:`_ss2d_step`, chunk by chunk from the
    end: the chunk's states are recomputed token by token from the state the forward pass
    stored at its start and kept in ``hs`` (B, 4, BLOCK_T, N, d) float32 (each thread rereads
    only its own entries), then the adjoint recurrence
    g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} runs back through them one token at a time.
    Everything per channel (dx, the step sizes' gradient, dA) is a thread's own arithmetic;
    dB and dC, sums over channels, are reduced over the block and added atomically.

    Outputs: dx (4, B, L, d), this direction's share of x's gradient (summed by the caller);
    the raw step sizes' gradient (4, d, B, L) at ``sg_*`` strides (softplus' derivative
    applied); dA (B, 4, d, N), summed over batch by the caller; dB and dC (B, 4, N, L) added to.
    """
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    k = tl.program_id(2)
    c = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mc = c < DK
    mn = n < NS
    A = _channel_states(A_ptr, k, NS, sA_n, c, n, mc, mn)
    bias = tl.load(bias_ptr + k * DK + c, mask=mc, other=0.0).to(tl.float32)
    _first, step, wrap = _walk(k, L, W)  # chunks start at _token_at
    x_row = x_ptr + b * sx_b + c
    dy_row = dy_ptr + b * sx_b + c
    dt_row = dt_ptr + k.to(tl.int64) * sdt_k + b * sdt_b + c.to(tl.int64) * sdt_d
    g_row = ddt_ptr + k.to(tl.int64) * sg_k + b * sg_b + c.to(tl.int64) * sg_d
    dx_row = dx_ptr + (k * (tl.num_programs(0)) + b) * L * DK + c  # (4, B, L, d) contiguous
    b_row, c_row, s_l = _bc_rows(bc_ptr, b, k, L, NS, n, BLOCK_N, EVEN_N)
    grad_row = b * sB_b + k * sB_k + n * sB_n  # dB, dC
    # The chunk's states (B, 4, BLOCK_T, N, d): channels adjacent, ``sA_n`` apart per state,
    # so that the stores and loads keep the layout A's load gives (see _ckpt_offsets)
    hs_tile = hs_ptr + (b * 4 + k) * BLOCK_T * NS * sA_n + n[None, :] * sA_n + c[:, None]
    s_j = NS * sA_n  # hs's tokens
    ag = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # exp(delta_{t+1} A) g_{t+1}
    dA = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for cc in range(N_CHUNKS):
        ci = N_CHUNKS - 1 - cc
        t0 = ci * BLOCK_T
        count = tl.minimum(BLOCK_T, L - t0)
        co = _ckpt_offsets(b, k, ci, c, n, 4, NS, N_CHUNKS, sA_n)
        h = tl.load(ckpt_ptr + co, mask=mc[:, None] & mn[None, :], other=0.0)
        # Both walks load a token's inputs one step ahead, so their latency overlaps the math.
        pos = _token_at(t0, k, L, H, W)
        u_n, raw_n, B_n, _ = _token_inputs(x_row, dt_row, b_row, c_row, pos, sx_l, sdt_l, s_l, mc, mn, EVEN_N)
        for j in range(count):
            u, raw, Bv = u_n, raw_n, B_n
            nxt, ahead = _next_position(pos, step, wrap, L)
            u_n, raw_n, B_n, _ = _token_inputs(
                x_row, dt_row, b_row, c_row, ahead, sx_l, sdt_l, s_l, mc, mn, EVEN_N
            )  # fmt: skip
            h = _advance(h, u, raw, Bv, bias, A)
            tl.store(hs_tile + j * s_j, h, mask=mc[:, None] & mn[None, :])
            pos = nxt
        tl.debug_barrier()  # the chunk's states are read back below
        pos = _token_at(t0 + count - 1, k, L, H, W)
        u_n, raw_n, B_n, C_n, dy_n, h_n = _token_grads_inputs(
            x_row, dt_row, b_row, c_row, dy_row, hs_tile, pos, count - 1,
            sx_l, sdt_l, s_l, s_j, mc, mn, EVEN_N,
        )  # fmt: skip
        for jj in range(count):
            u, raw, Bv, Cv, dy, h = u_n, raw_n, B_n, C_n, dy_n, h_n
            prv, behind = _next_position(pos, -step, -wrap, L)  # the walk backwards
            u_n, raw_n, B_n, C_n, dy_n, h_n = _token_grads_inputs(
                x_row, dt_row, b_row, c_row, dy_row, hs_tile, behind, tl.maximum(count - 2 - jj, 0),
                sx_l, sdt_l, s_l, s_j, mc, mn, EVEN_N,
            )  # fmt: skip
            u = u.to(tl.float32)
            Bv = Bv.to(tl.float32)[None, :]
            Cv = Cv.to(tl.float32)[None, :]
            r, dt, a = _decay(raw, bias, A)
            g = Cv * dy[:, None] + ag
            uB = u[:, None] * Bv
            decayed = h - dt[:, None] * uB  # exp(delta_t A) h_{t-1}
            ddt = tl.sum(g * (uB + A * decayed), axis=1) * tl.sigmoid(r)
            tl.store(g_row + pos * sg_l, ddt, mask=mc)
            tl.store(dx_row + pos * DK, tl.sum(g * Bv, axis=1) * dt, mask=mc)
            dA += g * dt[:, None] * decayed
            tl.atomic_add(
                dB_ptr + grad_row + pos * sB_l, tl.sum(g * (dt * u)[:, None], axis=0), mask=mn, sem="relaxed"
            )
            tl.atomic_add(
                dC_ptr + grad_row + pos * sB_l, tl.sum(h * dy[:, None], axis=0), mask=mn, sem="relaxed"
            )
            ag = a * g
            pos = prv
        tl.debug_barrier()  # before the next chunk's states overwrite these
    tl.store(dA_ptr + ((b * 4 + k) * DK + c[:, None]) * NS + n[None, :], dA, mask=mc[:, None] & mn[None, :])


def _infer_block(dk: int) -> int:
    """Channels per stepping program, one per thread: 64 (two warps), fewer for narrow layers."""
    return min(64, triton.next_power_of_2(dk))


def _state_rows(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """B and C (B, 4, N, L) as the stepping kernel reads them: bc (B, 4, L, 2N) float32,
    contiguous, each token's B then C in one row. bfloat16 projections are converted here,
    once per token, rather than by every thread at every step (a third of the step's
    instructions)."""
    b, k, n, length = B.shape
    bc = B.new_empty(b, k, length, 2 * n, dtype=torch.float32)
    bc[..., :n] = B.transpose(2, 3)
    bc[..., n:] = C.transpose(2, 3)
    return bc


def _ss2d_directions(
    x, dts, bias, A, B, C, h: int, w: int, block_d: int | None = None, ckpt=None, dtype=torch.float32
):
    """Each direction's scan output, (4, B, L, d) in ``dtype`` (the states are float32 either
    way; see :func:`ss2d_infer` for the arguments); ``ckpt`` (B, 4, ceil(L / BLOCK_T), N, d)
    float32: filled with the states entering each chunk of BLOCK_T steps, for the backward
    pass."""
    b, length, d = x.shape
    ns = A.shape[-1]
    x = x.contiguous()
    At = A.transpose(1, 2).contiguous()  # (4, N, d): see _ss2d_step
    bias = bias.contiguous()
    bc = _state_rows(B, C)
    block_d = block_d or _infer_block(d)
    block_n = triton.next_power_of_2(ns)
    y = x.new_empty(4, b, length, d, dtype=dtype)
    sdt = dts.stride()  # (4, d, B, L)
    strides = (length * d, d, sdt[0], sdt[2], sdt[3], sdt[1], b * length * d, length * d, d)
    grid = (b, triton.cdiv(d, block_d), 4)
    n_chunks = triton.cdiv(length, BLOCK_T)
    _launch(_ss2d_step, grid, (x, dts, At, bc, bias, y, y if ckpt is None else ckpt),
            (length, w, d, ns, d, n_chunks), strides, BLOCK_D=block_d, BLOCK_N=block_n, EVEN_N=block_n == ns,
            SAVE_CKPT=ckpt is not None, BLOCK_T=BLOCK_T,
            num_warps=max(1, block_d // 32))  # fmt: skip
    return y


def ss2d_infer(x, dts, bias, A, B, C, h: int, w: int, block_d: int | None = None) -> torch.Tensor:
    """The SS2D scan without gradients (see :class:`SS2DScan` for the arguments): (B, L, d)
    float32, summed over directions, by the stepping kernel (``block_d`` channels per program,
    a power of two; by default :func:`_infer_block`). ``dts`` may be any strided view (token-
    major, (4, B, L, d) in memory, reads coalesced); B and C are made float32 rows."""
    return _ss2d_directions(x, dts, bias, A, B, C, h, w, block_d).sum(0)


@triton.jit
def _normalize(v, m, c, D, w_ptr, b_ptr, eps):
    """LayerNorm of one row ``v`` (float32, zero outside ``m``) with weight and bias."""
    mean = tl.sum(v, axis=0) / D
    diff = tl.where(m, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
    out = diff * rstd * tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    return out + tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _merge_norm_gate(
    y_ptr, x_ptr, dsum_ptr, w_ptr, b_ptr, z_ptr, out_ptr, D, eps, sy_k, sz_r,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One token: s = sum over the four directions of y + dsum * x, LayerNorm(s) (weight w,
    bias b), times z * sigmoid(z); float32 inside, stored in out's dtype."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < D
    row = r * D + c
    sk = tl.cast(sy_k, tl.int64)  # 3 * B * L * d may pass 2**31
    xv = tl.load(x_ptr + row, mask=m, other=0.0).to(tl.float32)
    s = tl.load(dsum_ptr + c, mask=m, other=0.0).to(tl.float32) * xv
    for k in tl.static_range(4):
        s += tl.load(y_ptr + k * sk + row, mask=m, other=0.0).to(tl.float32)
    out = _normalize(s, m, c, D, w_ptr, b_ptr, eps)
    z = tl.load(z_ptr + r * sz_r + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, (out * z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scaled_add_norm(
    a_ptr, s_ptr, r_ptr, w_ptr, b_ptr, out_ptr, D, eps, sa_r, sr_r,
    HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: LayerNorm(a * s + r) (s per channel, r a second row; each optional), float32
    inside, stored in out's dtype."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < D
    v = tl.load(a_ptr + i * sa_r + c, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        v = v * tl.load(s_ptr + c, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(r_ptr + i * sr_r + c, mask=m, other=0.0).to(tl.float32)
    out = _normalize(v, m, c, D, w_ptr, b_ptr, eps)
    tl.store(out_ptr + i * D + c, out.to(out_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, channels) with unit channel stride (a view where one exists)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def _norm_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def scaled_add_norm(
    a, weight, bias, eps: float, dtype: torch.dtype, scale=None, residual=None
) -> torch.Tensor:
    """``F.layer_norm(a * scale + residual)`` over the last dimension (``scale`` per channel,
    ``residual`` shaped like ``a``; each optional) in one pass, float32 inside, in ``dtype``:
    no intermediate of the product or the sum, no separate cast of the result. Without
    gradients."""
    shape, d = a.shape, a.shape[-1]
    rows = _rows(a)
    res = rows if residual is None else _rows(residual)
    out = torch.empty(shape, dtype=dtype, device=a.device)
    block = triton.next_power_of_2(d)
    tensors = (rows, rows if scale is None else scale.contiguous(), res, weight, bias, out)
    _launch(_scaled_add_norm, (rows.shape[0],), tensors, (d, float(eps)), (rows.stride(0), res.stride(0)),
            HAS_SCALE=scale is not None, HAS_RES=residual is not None, BLOCK=block,
            num_warps=_norm_warps(block))  # fmt: skip
    return out


def ss2d_infer_gated(x, dts, bias, A, B, C, h: int, w: int, dsum, norm_weight, norm_bias, eps: float, z):
    """SS2D's scan and its output gate without gradients: LayerNorm(scan + dsum * x) * silu(z)
    as SS2D computes it, (B, L, d) in z's dtype, with the four directions' outputs summed,
    normalised and gated in one pass over them (no (B, L, d) float32 intermediates). z:
    (B, H, W, d) or (B, L, d), channels contiguous; the rest as in :func:`ss2d_infer`.

    With a bfloat16 z (autocast) each direction's output is stored in bfloat16: that buffer,
    four times the output, is most of the traffic around the scan (2 GiB of float32 at the
    encoder's 64x64 level at batch 32). Each direction's output is rounded to 2**-9 of itself,
    then summed, normalised and gated in float32, and the result rounded to bfloat16 (with
    float16, whose range a direction's output could leave, the buffer stays float32). States,
    the sum over directions and the LayerNorm stay float32."""
    b, length, d = x.shape
    dtype = torch.bfloat16 if z.dtype == torch.bfloat16 else torch.float32
    y = _ss2d_directions(x, dts, bias, A, B, C, h, w, dtype=dtype)
    z = _rows(z)
    out = torch.empty(b, length, d, dtype=z.dtype, device=x.device)
    block = triton.next_power_of_2(d)
    tensors = (y, x.contiguous(), dsum.contiguous(), norm_weight, norm_bias, z, out)
    _launch(_merge_norm_gate, (b * length,), tensors, (d, float(eps)), (b * length * d, z.stride(0)),
            BLOCK=block, num_warps=_norm_warps(block))  # fmt: skip
    return out


def _blocks(dk: int, ns: int, cpg: int) -> tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_N, ONE_GROUP) for ``dk`` channels per direction, ``ns`` states and
    ``cpg`` channels per B/C group: the largest channel block within the register budget,
    halved (down to 4) until it divides the group size, so that its B/C gradients can be
    summed over the block before the atomic adds."""
    block_n = triton.next_power_of_2(ns)
    block_d = max(1, min(32, TILE_BUDGET // (block_n * BLOCK_T), triton.next_power_of_2(dk)))
    while block_d > 4 and cpg % block_d:
        block_d //= 2
    return block_d, block_n, cpg % block_d == 0


def _launch(kernel, grid, tensors, sizes, strides, **flags):
    device = tensors[0].device
    if device.type == "cuda":  # Triton launches on the current device, not the tensors'
        with torch.cuda.device(device):
            kernel[grid](*tensors, *sizes, *strides, **flags)
    else:
        kernel[grid](*tensors, *sizes, *strides, **flags)


class SelectiveScan(torch.autograd.Function):
    """y, last_state = selective scan of (Bt, D, L) inputs with (Bt, G, N, L) B and C; ``save``:
    whether a backward pass can follow (chunk states are stored only then)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, save):
        bt, d, length = u.shape
        groups, ns = B.shape[1], A.shape[1]
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
        block_d, block_n, one_group = _blocks(d, ns, d // groups)
        n_chunks = triton.cdiv(length, BLOCK_T)
        save = save and any(ctx.needs_input_grad)  # the caller knows whether grad mode is on
        y = torch.empty_like(u)
        last = u.new_empty(bt, d, ns, dtype=torch.float32)
        ckpt = u.new_empty(bt, n_chunks, ns, d, dtype=torch.float32) if save else last
        grid = (bt, triton.cdiv(d, block_d))
        flags = {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
                 "SOFTPLUS": bool(softplus)}  # fmt: skip
        geometry = _plain_geometry(u, groups, ns, n_chunks)
        _launch(_scan_fwd, grid, (u, delta, A, B, C, _or(D, u), _or(delta_bias, u), _or(z, u), y, ckpt, last),
                *geometry, SAVE_CKPT=save, BLOCK_D=block_d, BLOCK_N=block_n,
                BLOCK_T=BLOCK_T, **flags)  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.setup = (grid, flags, geometry, one_group, block_d, block_n)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        grid, flags, geometry, one_group, block_d, block_n = ctx.setup
        f32 = {"dtype": torch.float32, "device": u.device}
        dy = torch.zeros(u.shape, **f32) if dy is None else dy.contiguous()
        dlast = None if dlast is None else dlast.contiguous()  # e.g. a broadcast scalar: stride 0
        du, ddelta = torch.empty(u.shape, **f32), torch.empty(u.shape, **f32)
        dz = torch.empty(u.shape, **f32) if z is not None else du
        dA = torch.zeros(A.shape, **f32)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(B.shape, **f32)
        dD = torch.zeros(u.shape[1], **f32)
        tensors = (u, delta, A, B, C, _or(D, u), _or(delta_bias, u), _or(z, u), dy, ckpt, _or(dlast, dy),
                   du, ddelta, dA, dB, dC, dD, dz)  # fmt: skip
        _launch(_scan_bwd, grid, tensors, *geometry, K=1, CROSS=False, HAS_DLAST=dlast is not None,
                ONE_GROUP=one_group, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=BLOCK_T, **flags)  # fmt: skip
        dbias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)
        dD = None if D is None else dD.to(D.dtype)
        dz = None if z is None else dz.to(z.dtype)
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD, dz, dbias, None, None)  # fmt: skip


def _or(t, fallback):
    """A tensor for a pointer argument the kernel never reads (its flag is off)."""
    return fallback if t is None else t


def _plain_geometry(u, groups: int, ns: int, n_chunks: int):
    """Sizes and strides of the plain scan: u, delta, z, y (Bt, D, L); B, C (Bt, G, N, L)."""
    bt, d, length = u.shape
    sizes = (length, 1, 1, d, d // groups, ns, n_chunks)
    strides = (d * length, length, 1, 0, d * length, length, 1, groups * ns * length, ns * length, length, 1)
    return sizes, strides


class SS2DScan(torch.autograd.Function):
    """The four-direction SS2D scan (no D term), summed over directions: x (B, L, d) -> (B, L, d)
    float32; step sizes (4, d, B, L) raw (bias and softplus applied here; token-major in
    memory as SS2D makes them, or they are made contiguous), A (4, d, N), B and C
    (B, 4, N, L), all in row-major token order."""

    @staticmethod
    def forward(ctx, x, dts, bias, A, B, C, h, w):
        b, length, d = x.shape
        ns = A.shape[-1]
        x, bias, A, B, C = (t.contiguous() for t in (x, bias, A, B, C))
        if not dts.permute(0, 2, 3, 1).is_contiguous():  # token-major step sizes stay as they are
            dts = dts.contiguous()
        n_chunks = triton.cdiv(length, BLOCK_T)
        # The forward steps through the tokens as inference does, storing the chunk states the
        # backward recomputes from.
        ckpt = x.new_empty(b, 4, n_chunks, ns, d, dtype=torch.float32) if any(ctx.needs_input_grad) else None
        y = _ss2d_directions(x, dts, bias, A, B, C, h, w, ckpt=ckpt).sum(0)
        block_d, block_n, _ = _blocks(d, ns, d)
        ctx.save_for_backward(x, dts, bias, A, B, C, ckpt)
        ctx.hw = (h, w)
        ctx.setup = (
            (b, triton.cdiv(d, block_d)),
            _cross_geometry(x, dts, B, h, w, ns, n_chunks),
            block_d,
            block_n,
        )
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dts, bias, A, B, C, ckpt = ctx.saved_tensors
        f32 = {"dtype": torch.float32, "device": x.device}
        dy = dy.contiguous()
        # in the step sizes' layout (the chunked kernel takes their strides)
        ddts = torch.empty_like(dts, dtype=torch.float32)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(B.shape, **f32)
        if SS2D_BACKWARD == "stepping":
            dx, dA = _ss2d_step_backward(x, dts, bias, A, B, C, dy, ckpt, ctx.hw, ddts, dB, dC)
        else:
            grid, geometry, block_d, block_n = ctx.setup
            dx = torch.empty(x.shape, **f32)
            dA = torch.zeros(A.shape, **f32)
            tensors = (x, dts, A, B, C, x, bias, x, dy, ckpt, dy, dx, ddts, dA, dB, dC, dx, dx)
            _launch(_scan_bwd, grid, tensors, *geometry, K=4, CROSS=True, HAS_D=False, HAS_Z=False,
                    HAS_BIAS=True, SOFTPLUS=True, HAS_DLAST=False, ONE_GROUP=True, BLOCK_D=block_d,
                    BLOCK_N=block_n, BLOCK_T=BLOCK_T)  # fmt: skip
        return (dx.to(x.dtype), ddts.to(dts.dtype), ddts.sum((2, 3)).to(bias.dtype), dA.to(A.dtype),
                dB.to(B.dtype), dC.to(C.dtype), None, None)  # fmt: skip


def _ss2d_step_backward(x, dts, bias, A, B, C, dy, ckpt, hw, ddts, dB, dC):
    """SS2D's backward by :func:`_ss2d_step_bwd`: fills ``ddts``, adds to ``dB`` and ``dC``,
    returns (dx, dA), summed over directions and batch here (deterministically; the price, as
    in the forward, is a (4, B, L, d) float32 buffer for the directions' shares of dx)."""
    b, length, d = x.shape
    ns = A.shape[-1]
    h, w = hw
    block_d = min(32, triton.next_power_of_2(d))
    block_n = triton.next_power_of_2(ns)
    blocks = triton.cdiv(d, block_d)
    f32 = {"dtype": torch.float32, "device": x.device}
    states = torch.empty(b, 4, BLOCK_T, ns, d, **f32)  # the chunk being walked back
    dx = torch.empty(4, b, length, d, **f32)
    dA = torch.empty(b, 4, d, ns, **f32)
    sdt, sg, sB = dts.stride(), ddts.stride(), dB.stride()
    At = A.transpose(1, 2).contiguous()  # (4, N, d): see _ss2d_step
    tensors = (x, dts, At, _state_rows(B, C), bias, dy, ckpt, states, dx, ddts, dA, dB, dC)
    sizes = (length, h, w, d, ns, d, ckpt.shape[2])
    strides = (length * d, d, sdt[0], sdt[2], sdt[3], sdt[1], sg[0], sg[2], sg[3], sg[1], sB[0], sB[1], sB[2],
               sB[3])  # fmt: skip
    _launch(_ss2d_step_bwd, (b, blocks, 4), tensors, sizes, strides, BLOCK_D=block_d, BLOCK_N=block_n,
            EVEN_N=block_n == ns, BLOCK_T=BLOCK_T, num_warps=max(1, block_d // 32))  # fmt: skip
    return dx.sum(0), dA.sum(0)


def _cross_geometry(x, dts, B, h: int, w: int, ns: int, n_chunks: int):
    """Sizes and strides of SS2D: x, y (B, L, d) contiguous; step sizes (4, d, B, L) and B, C
    (B, 4, N, L) as strided as they come."""
    b, length, d = x.shape
    sdt, sB = dts.stride(), B.stride()
    sizes = (length, h, w, d, d, ns, n_chunks)
    strides = (length * d, 1, d, sdt[0], sdt[2], sdt[1], sdt[3], *sB)
    return sizes, strides
