"""Selective scan backends against the step-by-step reference on fresh random inputs."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mambastyle.layers.selective_scan import available_backends, resolve_backend, selective_scan

FAST_CPU = [b for b in ("cpu",) if b in available_backends("cpu")]


def make_inputs(bt=2, d=8, n=4, length=50, groups=2, a_scale=5.0, dtype=torch.float64, device="cpu"):
    """Mamba-like inputs: A <= 0 (S4D-real-like), delta before softplus, B/C per group."""
    kw = {"dtype": dtype, "device": device}
    return {
        "u": torch.randn(bt, d, length, **kw),
        "delta": torch.randn(bt, d, length, **kw) * 0.5 - 1.0,
        "A": -torch.rand(d, n, **kw) * a_scale,
        "B": torch.randn(bt, groups, n, length, **kw) if groups else torch.randn(bt, n, length, **kw),
        "C": torch.randn(bt, groups, n, length, **kw) if groups else torch.randn(bt, n, length, **kw),
        "D": torch.randn(d, **kw),
        "z": torch.randn(bt, d, length, **kw),
        "delta_bias": torch.randn(d, **kw) * 0.1,
    }


def run(inputs, backend, dtype=None, loss_weights=None, **kw):
    """Output, last state and gradients of every input for a random linear loss."""
    xs = {k: (v.to(dtype) if dtype else v).clone().requires_grad_() for k, v in inputs.items()}
    y, last = selective_scan(**xs, return_last_state=True, backend=backend, **kw)
    wy, wl = loss_weights
    loss = (y.double() * wy).sum() + (last.double() * wl).sum()
    loss.backward()
    return y.detach().double(), last.detach().double(), {k: v.grad.double() for k, v in xs.items()}


def assert_close_rel(got, want, rtol, name):
    scale = want.abs().max().clamp_min(1e-12)
    err = ((got - want).abs().max() / scale).item()
    assert err < rtol, f"{name}: max error {err:.2e} relative to max |ref| {scale:.2e}"


@pytest.mark.parametrize("backend", FAST_CPU)
@pytest.mark.parametrize(
    "shape",
    [
        {"bt": 2, "d": 8, "n": 4, "length": 50, "groups": 2},
        {"bt": 1, "d": 6, "n": 16, "length": 130, "groups": 0},  # B/C without a group dim
        {"bt": 3, "d": 16, "n": 3, "length": 64, "groups": 4},  # exactly one chunk
        {"bt": 2, "d": 4, "n": 2, "length": 1, "groups": 1},
        {"bt": 1, "d": 42, "n": 5, "length": 70, "groups": 2},  # 21 per group: a full and a partial block
    ],
)
def test_backend_matches_reference_forward_and_gradients(backend, shape):
    inputs = make_inputs(**shape)
    bt, d, length = inputs["u"].shape
    weights = (
        torch.randn(bt, d, length, dtype=torch.float64),
        torch.randn(bt, d, inputs["A"].shape[1], dtype=torch.float64),
    )
    ref = run(inputs, "ref", loss_weights=weights, delta_softplus=True)
    got = run(inputs, backend, dtype=torch.float32, loss_weights=weights, delta_softplus=True)
    # bound: float32 vs float64 over <= 130 steps: measured (30 seeds) y <= 4.7e-7, state <= 6e-7, gradients
    # <= 1.7e-6 of max |ref|: 1e-5 and 1e-4 leave >= 17x
    assert_close_rel(got[0], ref[0], 1e-5, "y")
    assert_close_rel(got[1], ref[1], 1e-5, "last state")
    for k in inputs:
        assert_close_rel(got[2][k], ref[2][k], 1e-4, f"d{k}")


@pytest.mark.parametrize("backend", FAST_CPU)
def test_long_sequence_with_strong_decay_stays_finite_and_exact(backend):
    # L = 4096 and |A| * sum(dt) in the thousands: any closed form dividing by the
    # cumulative decay would overflow float32 here.
    inputs = make_inputs(bt=1, d=4, n=16, length=4096, groups=1, a_scale=50.0)
    inputs["delta"] = inputs["delta"] + 2.0  # softplus(delta) ~ 1..3 per step
    weights = (torch.randn(1, 4, 4096, dtype=torch.float64), torch.randn(1, 4, 16, dtype=torch.float64))
    ref = run(inputs, "ref", loss_weights=weights, delta_softplus=True)
    got = run(inputs, backend, dtype=torch.float32, loss_weights=weights, delta_softplus=True)
    for part in (got[0], got[1], *got[2].values()):
        assert torch.isfinite(part).all()
    # bound: strong decay forgets quickly, so no error builds up: measured y <= 6.4e-7, gradients <= 1.7e-6
    assert_close_rel(got[0], ref[0], 1e-5, "y")
    for k in inputs:
        assert_close_rel(got[2][k], ref[2][k], 1e-4, f"d{k}")


@pytest.mark.parametrize("backend", FAST_CPU)
def test_long_sequence_with_slow_decay_carries_state(backend):
    # Tiny decay: the state integrates over all 4096 steps (and across every chunk).
    inputs = make_inputs(bt=1, d=4, n=4, length=4096, groups=1, a_scale=1e-3)
    weights = (torch.randn(1, 4, 4096, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64))
    ref = run(inputs, "ref", loss_weights=weights)
    got = run(inputs, backend, dtype=torch.float32, loss_weights=weights)
    # bound: the state sums ~4096 float32 terms (~sqrt(4096) * 6e-8 = 4e-6); measured y 2.8e-6 +- 1.5e-6
    # (max 7.3e-6 over 60 seeds), so 2e-5 is 11 sd; gradients <= 6.4e-6 against 2e-4
    assert_close_rel(got[0], ref[0], 2e-5, "y")
    for k in inputs:
        assert_close_rel(got[2][k], ref[2][k], 2e-4, f"d{k}")


def test_reference_matches_the_recurrence_written_out():
    inputs = make_inputs(bt=1, d=2, n=2, length=5, groups=1)
    u, dl, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    y = selective_scan(**inputs, delta_softplus=True, backend="ref")
    for d in range(2):
        h = [0.0, 0.0]
        for t in range(5):
            dt = math.log1p(math.exp(dl[0, d, t] + bias[d]))
            h = [math.exp(dt * A[d, n]) * h[n] + dt * B[0, 0, n, t] * u[0, d, t] for n in range(2)]
            out = sum(C[0, 0, n, t] * h[n] for n in range(2)) + D[d] * u[0, d, t]
            out *= z[0, d, t] / (1 + math.exp(-z[0, d, t]))
            # bound: both float64 over 5 steps of O(1) values: measured <= 4.4e-16, 1e-12 is ~2000x
            assert abs(float(out) - y[0, d, t].item()) < 1e-12


@pytest.mark.parametrize("backend", ["ref", *FAST_CPU])
def test_output_dtype_follows_input(backend):
    inputs = {k: v.float() for k, v in make_inputs().items()}
    assert selective_scan(**inputs, backend=backend).dtype == torch.float32
    if backend == "ref":
        inputs = {k: v.bfloat16() if k == "u" else v for k, v in inputs.items()}
        assert selective_scan(**inputs, backend=backend).dtype == torch.bfloat16


def test_auto_backend_and_errors():
    assert resolve_backend("auto", "cpu") == ("cpu" if FAST_CPU else "ref")
    with pytest.raises(RuntimeError, match="unavailable for cpu tensors"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="unknown scan backend"):
        resolve_backend("fast", "cpu")
    inputs = make_inputs()
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**inputs, "A": inputs["A"][:3]})
    with pytest.raises(ValueError, match="G dividing"):
        selective_scan(
            **{
                **inputs,
                "B": inputs["B"][:, :1].repeat(1, 3, 1, 1),
                "C": inputs["C"][:, :1].repeat(1, 3, 1, 1),
            }
        )
    with pytest.raises(ValueError, match="z must be"):
        selective_scan(**{**inputs, "z": inputs["z"][..., :-1]})


@pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in available_backends("cuda"),
    reason="needs a GPU and mamba-ssm (the `cuda` extra)",
)
def test_cuda_backend_matches_reference():  # pragma: no cover - GPU only
    inputs = make_inputs(bt=2, d=64, n=16, length=1024, groups=4, device="cuda")
    bt, d, length = inputs["u"].shape
    weights = (
        torch.randn(bt, d, length, dtype=torch.float64, device="cuda"),
        torch.zeros(bt, d, 16, dtype=torch.float64, device="cuda"),
    )
    ref = run(inputs, "ref", loss_weights=weights, delta_softplus=True)
    got = run(inputs, "cuda", dtype=torch.float32, loss_weights=weights, delta_softplus=True)
    assert_close_rel(got[0], ref[0], 1e-4, "y")
    for k in inputs:
        assert_close_rel(got[2][k], ref[2][k], 1e-3, f"d{k}")


@pytest.mark.skipif(not FAST_CPU, reason="needs numba")
def test_fast_exp_matches_numpy():
    import numpy as np

    from mambastyle.layers._scan_cpu import fast_exp

    x = np.concatenate([np.linspace(-87, 88, 20001), -np.logspace(-8, 1.9, 2001), [0.0]]).astype(np.float32)
    got = np.array([fast_exp(np.float32(v)) for v in x], dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    # bound: a fixed grid (no randomness); measured 1.15e-7 relative, ~2 float32 ulps (2^-23 = 1.2e-7)
    assert np.max(np.abs(got - want) / want) < 3e-7
    # far below the float32 range: a tiny positive number instead of a denormal
    # bound: the smallest normal float32 is 1.18e-38; measured 1.22e-38
    assert 0.0 <= fast_exp(np.float32(-1000.0)) < 2e-38


@pytest.mark.skipif(not FAST_CPU, reason="needs numba")
def test_fast_exp2_matches_numpy():
    import numpy as np

    from mambastyle.layers._scan_cpu import fast_exp2

    x = np.concatenate([np.linspace(-125, 127, 20001), -np.logspace(-8, 2, 2001), [0.0, 0.5, -0.5]])
    x = x.astype(np.float32)
    got = np.array([fast_exp2(np.float32(v)) for v in x], dtype=np.float64)
    want = np.exp2(x.astype(np.float64))
    # bound: a fixed grid; measured 1.5e-7 relative (~2 float32 ulps); exp2(-1000) clamps to 2.35e-38
    assert np.max(np.abs(got - want) / want) < 3e-7
    assert 0.0 < fast_exp2(np.float32(-1000.0)) < 1e-37  # clamped: tiny, never a denormal or garbage
    assert np.isfinite(fast_exp2(np.float32(1000.0)))


@pytest.mark.skipif(not FAST_CPU, reason="needs numba")
@pytest.mark.parametrize(("nd", "n_state"), [(16, 16), (5, 3), (16, 1)])
def test_vector_time_step_is_the_scalar_recurrence_bit_for_bit(rng, nd, n_state):
    # The backward recomputes the forward's states with the scalar fast_exp2, so the forward's
    # vector step must produce exactly the same state bits (last state and chunk states), also
    # for padding lanes, strided B/C and decays beyond the clamp.
    import numba
    import numpy as np

    from mambastyle.layers._scan_cpu import FASTMATH, LANES, LOG2E, fast_exp2, lane_buffers, scan_lanes

    @numba.njit(fastmath=FASTMATH)  # the backward kernels' flags
    def scalar_scan(order, dl, xl, A, Bk, Ck, T, hs, yl, ck):
        nd, n_state = A.shape
        for t in range(order.shape[0]):
            p = order[t]
            if t % T == 0:
                for j in range(nd):
                    for n in range(n_state):
                        ck[j, t // T, n] = hs[n, j]
            for j in range(LANES):
                acc = np.float32(0.0)
                for n in range(n_state):
                    a = A[j, n] * LOG2E if j < nd else np.float32(0.0)
                    hs[n, j] = fast_exp2(dl[p, j] * a) * hs[n, j] + dl[p, j] * xl[p, j] * Bk[p, n]
                    acc += Ck[p, n] * hs[n, j]
                yl[p, j] += acc

    length, chunk = 77, 16
    order = rng.permutation(length)
    dl, xl, yl, a2, hs = lane_buffers(length, n_state)
    dl[:, :nd] = rng.random((length, nd), dtype=np.float32) * 2
    dl[rng.integers(0, length, 5), 0] = 1e4  # decays far below 2^-125: clamped alike
    xl[:, :nd] = rng.standard_normal((length, nd), dtype=np.float32)
    A = -rng.random((nd, n_state), dtype=np.float32) * 8
    bc = rng.standard_normal((2, length, 2 * n_state), dtype=np.float32)
    Bk, Ck = bc[0, :, ::2], bc[1, :, 1::2]  # strided rows
    ck = np.zeros((nd, -(-length // chunk), n_state), np.float32)
    want_y, want_h, want_ck = yl.copy(), hs.copy(), ck.copy()
    scalar_scan(order, dl, xl, A, Bk, Ck, chunk, want_h, want_y, want_ck)
    scan_lanes(order, dl, xl, A, Bk, Ck, chunk, a2, hs, yl, ck)
    np.testing.assert_array_equal(hs, want_h)
    np.testing.assert_array_equal(ck, want_ck)
    # bound: the sum over states may be reassociated in the reference (fastmath); float32 rounding
    np.testing.assert_allclose(yl, want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max())
    assert not yl[:, nd:].any() and not hs[:, nd:].any()  # padding lanes stay zero


def test_wide_vectors_only_where_the_user_left_numba_alone(monkeypatch):
    pytest.importorskip("numba")
    import numba
    import numba.core.codegen

    from mambastyle.layers import selective_scan as ss

    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    monkeypatch.setattr(numba.core.codegen, "get_host_cpu_features", lambda: "+avx2,+avx512f,+fma")
    ss._prefer_wide_vectors()
    assert numba.config.CPU_FEATURES == "+avx2,+avx512f,+fma,-prefer-256-bit"

    numba.config.CPU_FEATURES = None
    monkeypatch.setattr(numba.core.codegen, "get_host_cpu_features", lambda: "+avx2,-avx512f,+fma")
    ss._prefer_wide_vectors()  # no AVX-512: nothing to change
    assert numba.config.CPU_FEATURES is None

    monkeypatch.setattr(numba.core.codegen, "get_host_cpu_features", lambda: "+avx2,+avx512f,+fma")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2")  # the user's choice wins
    ss._prefer_wide_vectors()
    assert numba.config.CPU_FEATURES is None


def test_cpu_backend_keeps_the_thread_count_torch_was_given():
    # In a fresh process, where numba's threading layer has not loaded yet: loading it sets
    # the OpenMP thread count that torch's intra-op pool shares to all cores.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import numba, torch
        from mambastyle.layers.selective_scan import selective_scan
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        x = [torch.randn(1, 4, 64, generator=g) for _ in range(2)]
        bc = [torch.randn(1, 1, 2, 64, generator=g) for _ in range(2)]
        a = -torch.rand(4, 2, generator=g).requires_grad_()
        selective_scan(x[0], x[1], a, *bc, backend="cpu").sum().backward()
        print(torch.get_num_threads(), numba.get_num_threads())
        """
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
