"""Compiled CPU kernels for the selective scan (numba; compiled on first call, cached on disk).

Only :mod:`mambastyle.layers.selective_scan` imports this module, and only when the
``cpu`` backend first runs, so ``import mambastyle`` never pays for numba.

Recurrence per batch b, channel d (group g = d // (D / G)) and state n:

    a_t = exp(delta_t * A[d, n])                       (0 < a_t <= 1 for A <= 0)
    h_t = a_t * h_{t-1} + delta_t * u_t * B[b, g, t, n]
    y_t = sum_n C[b, g, t, n] * h_t

The forward pass steps blocks of ``LANES`` channels through time together, one channel
per SIMD lane: each step is a handful of (N, LANES) vector operations with no reduction
across lanes, and B/C rows are read once per block. Decays are computed as
2^(delta * A log2 e) with ``fast_exp2`` (A pre-scaled once per block). It keeps only the
state at the start of every chunk of ``T`` steps (``ckpt``); the backward pass recomputes
each chunk's states from it, then runs the adjoint recurrence in reverse:
dh_{t-1} = a_t * (dh_t + C_t * dy_t). Nothing of size (L, N) per channel is ever stored,
so memory stays O(B * D * (L / T + 1) * N). B and C come in time-major layout
(Bt, G, L, N) so a step's row is contiguous.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

LANES = 16  # channels stepped through time together in the forward kernels, one per SIMD lane
LOG2E = np.float32(1.4426950408889634)

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


@intrinsic
def _float32_bits_as_int(typingctx, f):
    """Reinterprets a float32's bits as an int32."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


# Degree-5 minimax polynomial for 2**r on [-0.5, 0.5], highest power first: shared by the
# scalar fast_exp2 and its vector form in the forward kernel's time step, so that the
# forward's decays are bit for bit the ones the backward recomputes.
EXP2_POLY = tuple(
    np.float32(c)
    for c in (1.326472731307149e-3, 9.671512991189957e-3, 5.550733581185341e-2, 2.4022242426872253e-1,
              6.931470036506653e-1, 1.0)
)  # fmt: skip
EXP2_RANGE = (np.float32(-125.0), np.float32(127.0))


@nb.njit(inline="always", fastmath=FASTMATH)
def fast_exp2(x):  # pragma: no cover - compiled
    """float32 2**x in 13 vectorisable operations: the scan's decays, exp(dt * A) = 2**(dt * A log2 e).

    k = rint(x), r = x - k in [-0.5, 0.5], a degree-5 minimax polynomial for 2**r (max
    relative error 2e-7 in float32), and k added to its exponent bits. Inputs are clamped
    to [-125, 127]: below, the result is ~2e-38 instead of a denormal; above, finite.
    """
    x = min(max(x, EXP2_RANGE[0]), EXP2_RANGE[1])
    k = np.rint(x)
    r = x - k
    p = EXP2_POLY[0]
    p = p * r + EXP2_POLY[1]
    p = p * r + EXP2_POLY[2]
    p = p * r + EXP2_POLY[3]
    p = p * r + EXP2_POLY[4]
    p = p * r + EXP2_POLY[5]
    return _int_bits_as_float32(_float32_bits_as_int(p) + (np.int32(k) << 23))


def to_f32(v):  # pragma: no cover - replaced by its overload inside compiled code
    """A kernel input element as float32: float32 as is, int16 as the bits of a bfloat16."""
    raise NotImplementedError("only callable from compiled kernels")


@overload(to_f32, inline="always")
def _to_f32(v):
    # bfloat16 tensors reach the kernels as int16 views of the same bytes (numba has no
    # bfloat16): a bfloat16 is the upper half of the float32 with the same value.
    if isinstance(v, types.Integer):
        return lambda v: _int_bits_as_float32(np.int32(v) << 16)
    return lambda v: np.float32(v)


@nb.njit(inline="always")
def lane_buffers(length, n_state):  # pragma: no cover - compiled
    """Zeroed buffers of one block of LANES channels: step sizes, inputs and outputs (L, LANES),
    A * log2(e) and the state (N, LANES). Lanes past the block's channels stay zero."""
    dl = np.zeros((length, LANES), dtype=np.float32)
    xl = np.zeros((length, LANES), dtype=np.float32)
    yl = np.zeros((length, LANES), dtype=np.float32)
    a2 = np.zeros((n_state, LANES), dtype=np.float32)
    hs = np.zeros((n_state, LANES), dtype=np.float32)
    return dl, xl, yl, a2, hs


@nb.njit(inline="always")
def load_lanes(dst, src, d0, nd):  # pragma: no cover - compiled
    """dst[p, j] = src[p, d0 + j] for the block's nd channels: (L, D) channels-last rows
    (float32 or bfloat16 bits) into an (L, LANES) buffer. A full block takes the loop with a
    constant trip count, which compiles to one vector per token (the general loop does not)."""
    if nd == LANES:
        for p in range(dst.shape[0]):
            for j in range(LANES):
                dst[p, j] = to_f32(src[p, d0 + j])
    else:
        for p in range(dst.shape[0]):
            for j in range(nd):
                dst[p, j] = to_f32(src[p, d0 + j])


@nb.njit(inline="always")
def zero_padding(buffer, nd):  # pragma: no cover - compiled
    """Zeroes lanes nd.. of an (L, LANES) buffer (a block with fewer than LANES channels)."""
    if nd < LANES:
        for p in range(buffer.shape[0]):
            for j in range(nd, LANES):
                buffer[p, j] = 0.0


@nb.njit(inline="always")
def store_lanes(dst, d0, nd, yl, xl, dsum):  # pragma: no cover - compiled
    """dst[p, d0 + j] = yl[p, j] + dsum[d0 + j] * xl[p, j]: a block's outputs, plus the skip
    term, back into (L, D) channels-last rows (vector per token, as :func:`load_lanes`)."""
    if nd == LANES:
        for p in range(yl.shape[0]):
            for j in range(LANES):
                dst[p, d0 + j] = yl[p, j] + dsum[d0 + j] * xl[p, j]
    else:
        for p in range(yl.shape[0]):
            for j in range(nd):
                dst[p, d0 + j] = yl[p, j] + dsum[d0 + j] * xl[p, j]


# --------------------------------------------------------------------------- one time step, in IR
#
# The time step is written as LLVM IR on <LANES x float> vectors rather than as numba loops:
# the per-state loop sums C[n] * h[n] over the states, and in a numba array that running
# sum stays in memory (LLVM cannot prove the state rows written in the same loop do not
# alias it), so every state's update waited on a store-to-load round trip. As an SSA
# vector the sum lives in a register and the step is bound by arithmetic alone.

_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_IVEC = ir.VectorType(ir.IntType(32), LANES)
_I64 = ir.IntType(64)
FMULADD = f"llvm.fmuladd.v{LANES}f32"  # a * b + c, fused where the CPU has FMA


def _vconst(value) -> ir.Constant:
    return ir.Constant(_VEC, [float(np.float32(value))] * LANES)


def _vcall(builder, name, *args):
    """Calls the LLVM intrinsic ``name`` on vectors of LANES float32."""
    fnty = ir.FunctionType(_VEC, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _vsplat(builder, scalar):
    vec = builder.insert_element(ir.Constant(_VEC, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, ir.Constant(_VEC, ir.Undefined), ir.Constant(_IVEC, [0] * LANES))


def _vexp2(builder, x):
    """:func:`fast_exp2` of every lane: the same clamp, rounding, polynomial and exponent bits."""
    x = _vcall(builder, f"llvm.maxnum.v{LANES}f32", x, _vconst(EXP2_RANGE[0]))
    x = _vcall(builder, f"llvm.minnum.v{LANES}f32", x, _vconst(EXP2_RANGE[1]))
    k = _vcall(builder, f"llvm.rint.v{LANES}f32", x)
    r = builder.fsub(x, k)
    p = _vconst(EXP2_POLY[0])
    for c in EXP2_POLY[1:]:
        p = _vcall(builder, FMULADD, p, r, _vconst(c))
    scale = builder.shl(builder.fptosi(k, _IVEC), ir.Constant(_IVEC, [23] * LANES))
    return builder.bitcast(builder.add(builder.bitcast(p, _IVEC), scale), _VEC)


def _lane_row(builder, array, index):
    """Pointer to the LANES floats of row ``index`` of a C-contiguous (*, LANES) float32 array."""
    start = builder.gep(array.data, [builder.mul(index, ir.Constant(_I64, LANES))])
    return builder.bitcast(start, _VEC.as_pointer())


def _strided_f32(builder, array, i, j):
    """Loads ``array[i, j]`` of a 2-D float32 array through its byte strides (any layout)."""
    s0, s1 = cgutils.unpack_tuple(builder, array.strides, 2)
    at = builder.add(builder.mul(i, s0), builder.mul(j, s1))
    raw = builder.gep(builder.bitcast(array.data, ir.IntType(8).as_pointer()), [at])
    return builder.load(builder.bitcast(raw, _F32.as_pointer()), align=4)


def _loop_open(builder, count, name):
    """Opens ``for i in range(count)`` in IR: the loop's body block, entered only when
    count > 0, with the builder in it. Returns (entry, body, done, i); the body's other phis
    (created next, so that all phis come first) take their entry values from ``entry``."""
    entry = builder.block
    body = builder.append_basic_block(name)
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_I64, 0)), body, done)
    builder.position_at_end(body)
    i = builder.phi(_I64)
    i.add_incoming(ir.Constant(_I64, 0), entry)
    return entry, body, done, i


def _loop_close(builder, count, body, done, i):
    """Closes a loop of :func:`_loop_open` (whose body is one block) and moves to ``done``."""
    i_next = builder.add(i, ir.Constant(_I64, 1))
    i.add_incoming(i_next, body)
    builder.cbranch(builder.icmp_signed("<", i_next, count), body, done)
    builder.position_at_end(done)


def _lane_rows_type(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 2 and t.layout == "C"


@intrinsic
def lane_step(typingctx, hs, a2, dl, xl, bk, ck, yl, p):
    """One time step of a block of LANES channels at token p, for every state n:

        h[n] = 2^(dl[p] * a2[n]) * h[n] + dl[p] * xl[p] * bk[p, n]
        yl[p] += sum over n of ck[p, n] * h[n]

    hs, a2 (N, LANES) and dl, xl, yl (L, LANES): C-contiguous float32 (as
    :func:`lane_buffers` makes them); bk, ck (L, N) float32, any strides.
    """
    if not all(_lane_rows_type(t) for t in (hs, a2, dl, xl, yl)):
        raise TypingError("lane_step: hs, a2, dl, xl and yl must be C-contiguous 2-D float32 arrays")
    if not all(isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 2 for t in (bk, ck)):
        raise TypingError("lane_step: bk and ck must be 2-D float32 arrays")
    if not isinstance(p, types.Integer):
        raise TypingError("lane_step: p must be an integer")
    sig = types.void(hs, a2, dl, xl, bk, ck, yl, types.int64)

    def codegen(context, builder, signature, args):
        arrays = [
            context.make_array(t)(context, builder, v)
            for t, v in zip(signature.args[:7], args[:7], strict=True)
        ]
        hs_p, a2_p, dl_p, xl_p, bk_a, ck_a, yl_p = arrays
        token = args[7]

        def row(array, index):
            return _lane_row(builder, array, index)

        def element(array, n):  # bk[token, n] / ck[token, n]
            return _strided_f32(builder, array, token, n)

        n_state = cgutils.unpack_tuple(builder, bk_a.shape, 2)[1]
        step = builder.load(row(dl_p, token), align=4)
        drive = builder.fmul(step, builder.load(row(xl_p, token), align=4))
        entry, body, done, n = _loop_open(builder, n_state, "lane_step.state")
        acc = builder.phi(_VEC)
        acc.add_incoming(_vconst(0.0), entry)
        state = row(hs_p, n)
        decay = _vexp2(builder, builder.fmul(step, builder.load(row(a2_p, n), align=4)))
        new = _vcall(builder, FMULADD, decay, builder.load(state, align=4),
                     builder.fmul(drive, _vsplat(builder, element(bk_a, n))))  # fmt: skip
        builder.store(new, state, align=4)
        summed = _vcall(builder, FMULADD, _vsplat(builder, element(ck_a, n)), new, acc)
        acc.add_incoming(summed, body)
        _loop_close(builder, n_state, body, done, n)
        total = builder.phi(_VEC)
        total.add_incoming(_vconst(0.0), entry)
        total.add_incoming(summed, body)
        out = row(yl_p, token)
        builder.store(builder.fadd(builder.load(out, align=4), total), out, align=4)
        return context.get_dummy_value()

    return sig, codegen


DT_TOKENS = 8  # tokens whose step sizes lane_dt forms together


@intrinsic
def lane_dt(typingctx, dl, wt, bv, lk, p, count):
    """Raw step sizes of ``count`` consecutive tokens (1 or DT_TOKENS, a compile-time
    literal) for a block of LANES channels:

        dl[p + i] = bv + sum over r of wt[r] * lk[p + i, r]      (i < count)

    dl (L, LANES), wt (R, LANES) and bv (LANES,): C-contiguous float32; lk (L, R) float32,
    any strides. Each token's sum is a chain of R multiply-adds; the tokens' chains are
    independent, so forming DT_TOKENS at once keeps the FMA units busy (a single token's
    chain waits on each multiply-add's latency), and each row of wt is loaded once for all.
    """
    if not all(_lane_rows_type(t) for t in (dl, wt)):
        raise TypingError("lane_dt: dl and wt must be C-contiguous 2-D float32 arrays")
    if not (isinstance(bv, types.Array) and bv.dtype == types.float32 and bv.ndim == 1 and bv.layout == "C"):
        raise TypingError("lane_dt: bv must be a C-contiguous 1-D float32 array")
    if not (isinstance(lk, types.Array) and lk.dtype == types.float32 and lk.ndim == 2):
        raise TypingError("lane_dt: lk must be a 2-D float32 array")
    if not isinstance(p, types.Integer):
        raise TypingError("lane_dt: p must be an integer")
    if not (isinstance(count, types.IntegerLiteral) and count.literal_value in (1, DT_TOKENS)):
        raise TypingError(f"lane_dt: count must be the literal 1 or {DT_TOKENS}")
    tokens = count.literal_value
    sig = types.void(dl, wt, bv, lk, types.int64, count)

    def codegen(context, builder, signature, args):
        dl_a, wt_a, bv_a, lk_a = (
            context.make_array(t)(context, builder, v)
            for t, v in zip(signature.args[:4], args[:4], strict=True)
        )
        first = args[4]

        def row(array, index):
            return _lane_row(builder, array, index)

        def factor(token, r):  # lk[token, r], splat over the lanes
            return _vsplat(builder, _strided_f32(builder, lk_a, token, r))

        token_ids = [builder.add(first, ir.Constant(_I64, i)) for i in range(tokens)]
        rank = cgutils.unpack_tuple(builder, wt_a.shape, 2)[0]
        start = builder.load(builder.bitcast(bv_a.data, _VEC.as_pointer()), align=4)
        entry, body, done, r = _loop_open(builder, rank, "lane_dt.factor")
        accs = [builder.phi(_VEC) for _ in range(tokens)]
        weight = builder.load(row(wt_a, r), align=4)
        summed = []
        for token, acc in zip(token_ids, accs, strict=True):
            acc.add_incoming(start, entry)
            summed.append(_vcall(builder, FMULADD, weight, factor(token, r), acc))
        for acc, value in zip(accs, summed, strict=True):
            acc.add_incoming(value, body)
        _loop_close(builder, rank, body, done, r)
        totals = [builder.phi(_VEC) for _ in range(tokens)]
        for token, total, value in zip(token_ids, totals, summed, strict=True):
            total.add_incoming(start, entry)
            total.add_incoming(value, body)
            builder.store(total, row(dl_a, token), align=4)
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH)
def scan_lanes(order, dl, xl, A, Bk, Ck, T, a2, hs, yl, ck):  # pragma: no cover - compiled
    """Steps one block of channels through time from a zero state; lane j holds channel j.

    order (L,): the token visited at step t; dl, xl (L, LANES): step sizes and inputs per
    token; A (nd, N): the block's rows of A (nd <= LANES); Bk, Ck (L, N): B/C rows per token;
    a2 (N, LANES): scratch for A * log2(e); hs (N, LANES): out, the last state; yl (L, LANES):
    outputs, added to; ck (nd, n_chunks, N): out, the states entering each chunk of T steps.
    Padding lanes (dl = xl = a2 = 0) keep a zero state.
    """
    length = order.shape[0]
    nd, n_state = A.shape
    for j in range(nd):
        for n in range(n_state):
            a2[n, j] = A[j, n] * LOG2E
    hs[:] = 0.0
    c = 0
    for t in range(length):
        p = order[t]
        if t == c * T:
            for j in range(nd):
                for n in range(n_state):
                    ck[j, c, n] = hs[n, j]
            c += 1
        lane_step(hs, a2, dl, xl, Bk, Ck, yl, p)


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def scan_fwd(u, delta, A, Bm, Cm, T, y, ckpt, last):  # pragma: no cover - compiled
    """u, delta: (Bt, D, L); A: (D, N); Bm, Cm: (Bt, G, L, N) -> y (Bt, D, L),
    ckpt (Bt, D, ceil(L / T), N) states entering each chunk, last (Bt, D, N).

    Tasks are (batch, group, block of LANES channels of the group); each copies its rows
    into time-major (L, LANES) buffers and runs :func:`scan_lanes`.
    """
    n_batch, n_chan, length = u.shape
    n_groups = Bm.shape[1]
    n_state = A.shape[1]
    per_group = n_chan // n_groups
    blocks = (per_group + LANES - 1) // LANES
    order = np.arange(length)
    for task in nb.prange(n_batch * n_groups * blocks):
        b = task // (n_groups * blocks)
        rem = task - b * n_groups * blocks
        g = rem // blocks
        d0 = g * per_group + (rem - g * blocks) * LANES
        nd = min(LANES, (g + 1) * per_group - d0)
        dl, xl, yl, a2, hs = lane_buffers(length, n_state)
        for j in range(nd):
            for t in range(length):
                dl[t, j] = delta[b, d0 + j, t]
                xl[t, j] = u[b, d0 + j, t]
        scan_lanes(order, dl, xl, A[d0 : d0 + nd], Bm[b, g], Cm[b, g], T, a2, hs, yl, ckpt[b, d0 : d0 + nd])
        for j in range(nd):
            for t in range(length):
                y[b, d0 + j, t] = yl[t, j]
            for n in range(n_state):
                last[b, d0 + j, n] = hs[n, j]


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
        a2 = np.empty(n_state, dtype=np.float32)  # A * log2(e): the forward's decays exactly
        d_start = g * per_group + p * per_part
        d_stop = min(d_start + per_part, (g + 1) * per_group)
        for d in range(d_start, d_stop):
            for n in range(n_state):
                dh[n] = dlast[b, d, n]
                dA_acc[n] = 0.0
                a2[n] = A[d, n] * LOG2E
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
                        a = fast_exp2(dt * a2[n])
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


# --------------------------------------------------------------------------- fused SS2D scan
#
# The four SS2D directions read the same (H, W) grid in four orders. Instead of
# materialising four permuted copies of every input (cross-scan) and folding four outputs
# back (cross-merge), these kernels keep everything in row-major token order and visit
# position ``_pos(k, t)`` at step t of direction k. Step sizes arrive raw (before
# ``softplus(. + bias)``), which is applied in a vectorised pass per channel and direction.


@nb.njit(inline="always")
def _pos(k, t, h, w, length):  # pragma: no cover - compiled
    """Row-major token index visited at step t of direction k (0 rows, 1 columns, 2/3 reversed)."""
    if k >= 2:
        t = length - 1 - t
    if k == 1 or k == 3:
        return (t % h) * w + t // h
    return t


@nb.njit(inline="always", fastmath=FASTMATH)
def fast_softplus(v):  # pragma: no cover - compiled
    """log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)); log1p by its atanh series (|s| <= 1/3)."""
    e = fast_exp(-abs(v))  # (0, 1]
    s = e / (np.float32(2.0) + e)  # log1p(e) = 2 atanh(s)
    s2 = s * s
    p = np.float32(1.0 / 13.0)
    p = p * s2 + np.float32(1.0 / 11.0)
    p = p * s2 + np.float32(1.0 / 9.0)
    p = p * s2 + np.float32(1.0 / 7.0)
    p = p * s2 + np.float32(1.0 / 5.0)
    p = p * s2 + np.float32(1.0 / 3.0)
    p = p * s2 + np.float32(1.0)
    return max(v, np.float32(0.0)) + np.float32(2.0) * s * p


@nb.njit(inline="always", fastmath=FASTMATH)
def fast_sigmoid(v):  # pragma: no cover - compiled
    return np.float32(1.0) / (np.float32(1.0) + fast_exp(-v))


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def ss2d_fwd(x, dts, dt_weight, factored, bias, A, bc, dsum, h, w, T, y, ckpt):  # pragma: no cover - compiled
    """Layouts (tokens row-major, L = h * w): x (Bt, L, D) channels-last; bias (K, D);
    A (K, D, N); bc (Bt, L, K, R + 2N): per token and direction, R step-size factors, then B,
    then C; dsum (D,) -> y (Bt, L, D), the sum over the four directions plus dsum * x, and
    ckpt (Bt, K, D, ceil(L / T), N), the states entering each chunk of T steps.

    Raw step sizes (before ``softplus(. + bias)``) are ``dt_weight[k] @ factors`` with
    dt_weight (K, D, R) when ``factored``, formed here as the block scans (:func:`lane_dt`,
    DT_TOKENS tokens at a time; R may be 0), so the (K, D, Bt, L) step sizes never exist in
    memory; otherwise they are read from dts (K, D, Bt, L) and dt_weight is unused.
    x, dts and bc may be float32 or bfloat16 (as int16 bits); arithmetic is float32.

    Tasks are (batch, block of LANES channels); each runs the four directions over the
    block's (L, LANES) buffers with :func:`scan_lanes`, visiting tokens in each direction's
    order, and accumulates the four outputs before writing them once.
    """
    n_batch, length, n_chan = x.shape
    n_dir, _, n_state = A.shape
    rank = dt_weight.shape[2]
    blocks = (n_chan + LANES - 1) // LANES
    order = np.empty((n_dir, length), dtype=np.int64)
    for k in range(n_dir):
        for t in range(length):
            order[k, t] = _pos(k, t, h, w, length)
    # Step-size factors, B and C as contiguous float32 rows per batch and direction, for every block.
    lows = np.empty((n_batch, n_dir, length, rank), dtype=np.float32)
    rows = np.empty((n_batch, n_dir, 2, length, n_state), dtype=np.float32)
    for bk in nb.prange(n_batch * n_dir):
        b = bk // n_dir
        k = bk - b * n_dir
        for p in range(length):
            for r in range(rank):
                lows[b, k, p, r] = to_f32(bc[b, p, k, r])
            for n in range(n_state):
                rows[b, k, 0, p, n] = to_f32(bc[b, p, k, rank + n])
                rows[b, k, 1, p, n] = to_f32(bc[b, p, k, rank + n_state + n])
    for task in nb.prange(n_batch * blocks):
        b = task // blocks
        d0 = (task - b * blocks) * LANES
        nd = min(LANES, n_chan - d0)
        # Step sizes (softplus(raw + bias)) and inputs are written whole for every block
        # (padding lanes zeroed below); only the outputs accumulate.
        dl = np.empty((length, LANES), dtype=np.float32)
        xl = np.empty((length, LANES), dtype=np.float32)
        yl = np.zeros((length, LANES), dtype=np.float32)
        a2 = np.zeros((n_state, LANES), dtype=np.float32)
        hs = np.zeros((n_state, LANES), dtype=np.float32)
        wt = np.zeros((rank, LANES), dtype=np.float32)  # the block's dt_weight, factor-major
        bv = np.zeros(LANES, dtype=np.float32)
        load_lanes(xl, x[b], d0, nd)
        zero_padding(xl, nd)
        for k in range(n_dir):
            if factored:
                for j in range(nd):
                    bv[j] = bias[k, d0 + j]
                    for r in range(rank):
                        wt[r, j] = dt_weight[k, d0 + j, r]
                grouped = length - length % DT_TOKENS
                for p in range(0, grouped, DT_TOKENS):
                    lane_dt(dl, wt, bv, lows[b, k], p, DT_TOKENS)
                for p in range(grouped, length):
                    lane_dt(dl, wt, bv, lows[b, k], p, 1)
                for p in range(length):
                    for j in range(LANES):
                        dl[p, j] = fast_softplus(dl[p, j])
            else:
                for j in range(nd):
                    bj = bias[k, d0 + j]
                    for p in range(length):
                        dl[p, j] = fast_softplus(to_f32(dts[k, d0 + j, b, p]) + bj)
            zero_padding(dl, nd)  # padding lanes keep a zero step and a zero state
            scan_lanes(order[k], dl, xl, A[k, d0 : d0 + nd], rows[b, k, 0], rows[b, k, 1], T, a2, hs, yl,
                       ckpt[b, k, d0 : d0 + nd])  # fmt: skip
        store_lanes(y[b], d0, nd, yl, xl, dsum)


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)
def ss2d_bwd(dy, x, dts, bias, A, Bm, Cm, ckpt, h, w, T, parts, dx, ddts, dA, dB, dC):  # pragma: no cover
    """Gradients of :func:`ss2d_fwd`'s scan (without its dsum * x term), float32 inputs;
    layouts as there except B and C: Bm, Cm (Bt, K, L, N).

    Tasks (b, part) own a slice of channels for all directions, so ``dx`` sums over
    directions without races; dB/dC go to per-task slabs (Bt, K, parts, L, N) that the
    caller sums. ``ddts`` is w.r.t. the raw step sizes (softplus' derivative included).
    """
    n_batch, length, n_chan = x.shape
    n_dir = dts.shape[0]
    n_state = A.shape[2]
    per_part = (n_chan + parts - 1) // parts
    n_chunks = ckpt.shape[3]
    for task in nb.prange(n_batch * parts):
        b = task // parts
        p_idx = task - b * parts
        hs = np.empty((T + 1, n_state), dtype=np.float32)
        aa = np.empty((T, n_state), dtype=np.float32)
        dh = np.empty(n_state, dtype=np.float32)
        dA_acc = np.empty(n_state, dtype=np.float64)
        a2 = np.empty(n_state, dtype=np.float32)
        dl = np.empty(length, dtype=np.float32)
        xl = np.empty(length, dtype=np.float32)  # this channel's x, dy and dx, contiguous
        gl = np.empty(length, dtype=np.float32)
        dxl = np.empty(length, dtype=np.float32)
        for d in range(p_idx * per_part, min((p_idx + 1) * per_part, n_chan)):
            for p in range(length):
                xl[p] = x[b, p, d]
                gl[p] = dy[b, p, d]
                dxl[p] = 0.0
            for k in range(n_dir):
                bk = bias[k, d]
                for p in range(length):
                    dl[p] = fast_softplus(dts[k, d, b, p] + bk)
                for n in range(n_state):
                    dh[n] = 0.0
                    dA_acc[n] = 0.0
                    a2[n] = A[k, d, n] * LOG2E
                for c in range(n_chunks - 1, -1, -1):
                    t0 = c * T
                    steps = min(T, length - t0)
                    for n in range(n_state):
                        hs[0, n] = ckpt[b, k, d, c, n]
                    for i in range(steps):  # recompute the chunk's states
                        p = _pos(k, t0 + i, h, w, length)
                        dt = dl[p]
                        xv = dt * xl[p]
                        for n in range(n_state):
                            a = fast_exp2(dt * a2[n])
                            aa[i, n] = a
                            hs[i + 1, n] = a * hs[i, n] + xv * Bm[b, k, p, n]
                    for i in range(steps - 1, -1, -1):  # adjoint recurrence
                        p = _pos(k, t0 + i, h, w, length)
                        dt = dl[p]
                        xp = xl[p]
                        gy = gl[p]
                        dd = np.float32(0.0)
                        dxx = np.float32(0.0)
                        for n in range(n_state):
                            dhn = dh[n] + Cm[b, k, p, n] * gy
                            dC[b, k, p_idx, p, n] += gy * hs[i + 1, n]
                            a = aa[i, n]
                            hp = hs[i, n]
                            bn = Bm[b, k, p, n]
                            dd += dhn * (A[k, d, n] * a * hp + xp * bn)
                            dA_acc[n] += dhn * dt * a * hp
                            dB[b, k, p_idx, p, n] += dhn * dt * xp
                            dxx += dhn * bn
                            dh[n] = dhn * a
                        dxl[p] += dxx * dt
                        ddts[k, d, b, p] = dd * fast_sigmoid(dts[k, d, b, p] + bias[k, d])
                for n in range(n_state):
                    dA[b, k, d, n] = dA_acc[n]
            for p in range(length):
                dx[b, p, d] = dxl[p]
