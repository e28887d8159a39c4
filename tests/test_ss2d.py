"""Cross-scan/merge, SS2D and the VSS block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambastyle.layers.selective_scan import available_backends
from mambastyle.layers.ss2d import (
    SS2D,
    VSSBlock,
    cross_merge,
    cross_scan,
    projects_as_convolution,
    token_linear,
)


def test_cross_scan_orders_of_a_known_tensor():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, 20)
    assert torch.equal(xs[0, 0, 0], torch.arange(20.0))  # row-major
    # column-major: (h=0,w=0), (1,0), (2,0), (3,0), (0,1), ...
    assert xs[0, 1, 0, :5].tolist() == [0.0, 5.0, 10.0, 15.0, 1.0]
    assert torch.equal(xs[:, 2], xs[:, 0].flip(-1))
    assert torch.equal(xs[:, 3], xs[:, 1].flip(-1))


def test_cross_merge_of_cross_scan_sums_four_copies():
    x = torch.randn(2, 3, 4, 5)
    merged = cross_merge(cross_scan(x), 4, 5)
    # bound: four copies of each value summed: exact in practice (measured 0); default tolerance is slack
    torch.testing.assert_close(merged, 4 * x.flatten(2))


def test_cross_merge_places_each_direction_back_on_the_grid():
    h, w = 3, 4
    ys = torch.zeros(1, 4, 1, h * w)
    ys[0, 1, 0, 1] = 1.0  # column-major position 1 = (row 1, col 0) = row-major index 4
    ys[0, 2, 0, 0] = 10.0  # reversed row-major position 0 = last token
    ys[0, 3, 0, 0] = 100.0  # reversed column-major position 0 = (row 2, col 3) = last token
    merged = cross_merge(ys, h, w)[0, 0]
    expected = torch.zeros(h * w)
    expected[4] = 1.0
    expected[-1] = 110.0
    assert torch.equal(merged, expected)


def test_cross_merge_is_the_adjoint_of_cross_scan():
    x, y = torch.randn(2, 3, 5, 6), torch.randn(2, 4, 3, 30)
    lhs = (cross_scan(x) * y).sum()
    rhs = (x.flatten(2) * cross_merge(y, 5, 6)).sum()
    # bound: two float32 sums of 720 products in different orders: measured <= 1.5e-5 on sums up to 67
    # (30 seeds); the tolerance is >= 1e-4
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-4)


def test_ss2d_initialisation():
    m = SS2D(32, d_state=8, expand=2.0, dt_min=1e-3, dt_max=0.1)
    assert m.dt_rank == math.ceil(32 / 16)
    # bound: log/exp and softplus/inverse round trips in float32 err by ~1e-7 relative (A measured 4.8e-7
    # on 8); allclose's rtol 1e-5 and the 0.1% slack on dt are >= 100x that
    assert torch.allclose(m.A_logs.exp()[0], torch.arange(1, 9.0))
    assert torch.all(m.Ds == 1)
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs numba")
def test_ss2d_backends_agree_forward_and_backward():
    m = SS2D(16, d_state=4, expand=2.0)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    out = {}
    for backend in ("ref", "cpu"):
        m.scan_backend = backend
        m.zero_grad()
        x.grad = None
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[backend] = (y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in m.named_parameters()})
    # bound: float32 scans in another order: over 10 seeds the worst element used 0.2% (y), 0.3% (dx) and
    # 2.5% (parameter gradients) of these tolerances
    torch.testing.assert_close(out["cpu"][0], out["ref"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["cpu"][1], out["ref"][1], rtol=1e-4, atol=1e-5)
    for name, g in out["ref"][2].items():
        torch.testing.assert_close(out["cpu"][2][name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("shape", [(2, 5, 7, 24), (3, 1, 1, 24), (1, 1, 9, 24), (2, 4, 4, 24)])
def test_token_linear_is_the_linear_map_on_every_layout(shape):
    """On CPU it runs as a 1x1 convolution: the values and gradients of F.linear, for contiguous
    maps, channel slices (as SS2D's chunked in_proj output) and maps with unit sides."""
    wide = torch.randn(*shape[:3], 2 * shape[3], dtype=torch.float64)
    weight = torch.randn(40, shape[3], dtype=torch.float64)
    for x in (wide[..., : shape[3]].contiguous(), wide[..., shape[3] :]):
        results = []
        for f in (F.linear, token_linear):
            xs, ws = x.float().requires_grad_(), weight.float().requires_grad_()
            y = f(xs, ws)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results.append((y.detach(), xs.grad, ws.grad))
        assert results[1][0].shape == (*shape[:3], 40)
        # bound: float32 sums of <= 24 products (and of <= 126 for the weight's gradient) in
        # another order: ~1e-6 relative; the tolerances are 10x that
        for want, got in zip(results[0], results[1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_projections_run_as_convolutions_where_convolutions_get_tf32(monkeypatch):
    """On CUDA GPUs float32 projections follow the convolutions' TF32 setting; autocast and
    other dtypes keep F.linear; CPUs always take the convolution."""
    assert projects_as_convolution("cpu", torch.float32) and projects_as_convolution("cpu", torch.bfloat16)
    assert not projects_as_convolution("mps", torch.float32)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for conv_tf32, matmul_tf32, want in ((True, False, True), (True, True, False), (False, False, False)):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32
            # (True, False) are PyTorch's defaults; with matmuls allowed TF32 F.linear gets it
            # itself; with neither, full float32 was asked for everywhere
            assert projects_as_convolution("cuda", torch.float32) is want, (conv_tf32, matmul_tf32)
            assert not projects_as_convolution("cuda", torch.bfloat16)
            assert not projects_as_convolution("cuda", torch.float16)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
        assert not projects_as_convolution("cuda", torch.float32)  # autocast runs F.linear in bf16
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_vss_block_shapes_and_gradients():
    block = VSSBlock(16, d_state=4)
    x = torch.randn(2, 6, 6, 16, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert x.grad.abs().sum() > 0


def against_float64_reference(scan, backend: str, inputs: dict, h: int, w: int):
    """``scan``'s output and every input's gradient (for a random linear loss) on ``inputs``
    (float64): on ``ref`` in float64, on ``backend`` in float32; as (y, grads) per backend."""
    b, length, d = inputs["x"].shape
    weight = torch.randn(b, length, d, dtype=torch.float64)
    results = []
    for name, dtype in (("ref", torch.float64), (backend, torch.float32)):
        xs = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
        y = scan(**xs, h=h, w=w, backend=name)
        (y.double() * weight).sum().backward()
        results.append((y.detach().double(), {k: v.grad.double() for k, v in xs.items()}))
    return results


def assert_matches_reference(results, y_bound: float = 1e-5, grad_bound: float = 1e-4) -> None:
    """Largest errors relative to the reference's largest magnitude, output and each gradient."""
    (ref_y, ref_g), (got_y, got_g) = results
    assert ((got_y - ref_y).abs().max() / ref_y.abs().max()) < y_bound
    for k in ref_g:
        if ref_g[k].numel() == 0:  # e.g. a rank-0 dt_weight's gradient
            assert got_g[k].shape == ref_g[k].shape, k
            continue
        err = ((got_g[k] - ref_g[k]).abs().max() / ref_g[k].abs().max()).item()
        assert err < grad_bound, (k, err)


def ss2d_against_reference(backend: str, b: int, n: int, h: int, w: int, d: int):
    """ss2d_scan on fresh random inputs against the float64 reference (see against_float64_reference)."""
    from mambastyle.layers.ss2d import ss2d_scan

    length = h * w
    inputs = {
        "x": torch.randn(b, length, d, dtype=torch.float64),
        "dts": torch.randn(4, d, b, length, dtype=torch.float64) * 2,
        "A": -torch.rand(4, d, n, dtype=torch.float64) * 8,
        "B": torch.randn(b, 4, n, length, dtype=torch.float64),
        "C": torch.randn(b, 4, n, length, dtype=torch.float64),
        "D": torch.randn(4, d, dtype=torch.float64),
        "dt_bias": torch.randn(4, d, dtype=torch.float64),
    }
    return against_float64_reference(ss2d_scan, backend, inputs, h, w)


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs numba")
@pytest.mark.parametrize("h,w,d", [(9, 13, 6), (16, 4, 6), (1, 70, 6), (5, 7, 37)])
def test_fused_ss2d_scan_matches_cross_scan_reference(h, w, d):
    # bound: float32 vs float64 over <= 70 steps: measured (30 seeds) y <= 3.2e-7 and gradients <= 1.9e-6
    # of max |ref|, >= 30x under 1e-5 / 1e-4
    assert_matches_reference(ss2d_against_reference("cpu", 2, 5, h, w, d))


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs numba")
def test_fast_softplus_and_sigmoid():
    import numpy as np

    from mambastyle.layers._scan_cpu import fast_sigmoid, fast_softplus

    v = np.linspace(-60, 60, 12001).astype(np.float32)
    sp = np.array([fast_softplus(np.float32(x)) for x in v], dtype=np.float64)
    want = F.softplus(torch.from_numpy(v).double()).numpy()
    # bound: a fixed grid; measured 2.4e-7 (softplus) and 1.5e-7 (sigmoid) relative, 2-3 float32 ulps
    assert np.max(np.abs(sp - want) / np.maximum(want, 1e-30)) < 1e-6
    sg = np.array([fast_sigmoid(np.float32(x)) for x in v], dtype=np.float64)
    want = torch.sigmoid(torch.from_numpy(v).double()).numpy()
    assert np.max(np.abs(sg - want) / want) < 1e-6


def test_ss2d_scan_rejects_inconsistent_shapes():
    from mambastyle.layers.ss2d import ss2d_scan

    b, d, n, h, w = 1, 4, 3, 5, 6
    args = {
        "x": torch.randn(b, h * w, d),
        "dts": torch.randn(4, d, b, h * w),
        "A": -torch.rand(4, d, n),
        "B": torch.randn(b, 4, n, h * w),
        "C": torch.randn(b, 4, n, h * w),
        "D": torch.ones(4, d),
        "dt_bias": torch.zeros(4, d),
    }
    for backend in ["ref", *(["cpu"] if "cpu" in available_backends("cpu") else [])]:
        with pytest.raises(ValueError, match="L != h"):
            ss2d_scan(**args, h=h, w=w + 1, backend=backend)
        with pytest.raises(ValueError, match=r"B \(1, 4, 3, 29\)"):
            ss2d_scan(**{**args, "B": args["B"][..., :-1]}, h=h, w=w, backend=backend)
        assert ss2d_scan(**args, h=h, w=w, backend=backend).shape == (b, h * w, d)


def test_scan_backends_reports_what_each_model_runs():
    from mambastyle.layers.ss2d import describe_scan, scan_backends

    block = VSSBlock(8, d_state=2, scan_backend="ref")
    assert scan_backends(block, "cpu") == ["ref"]
    assert describe_scan(block, "cpu") == "scan backend ref on cpu"
    assert scan_backends(torch.nn.Linear(2, 2), "cpu") == []
    with pytest.raises(RuntimeError, match="unavailable"):
        scan_backends(VSSBlock(8, d_state=2, scan_backend="cuda"), "cpu")


def projected_against_reference(b: int, n: int, r: int, h: int, w: int, d: int, backend: str = "cpu"):
    """ss2d_scan_projected on ``backend`` on fresh random inputs against the float64 reference."""
    from mambastyle.layers.ss2d import ss2d_scan_projected

    inputs = {
        "x": torch.randn(b, h * w, d, dtype=torch.float64),
        "proj": torch.randn(b, h * w, 4, r + 2 * n, dtype=torch.float64),
        "dt_weight": torch.randn(4, d, r, dtype=torch.float64) / r**0.5,
        "A": -torch.rand(4, d, n, dtype=torch.float64) * 8,
        "D": torch.randn(4, d, dtype=torch.float64),
        "dt_bias": torch.randn(4, d, dtype=torch.float64),
    }
    return against_float64_reference(ss2d_scan_projected, backend, inputs, h, w)


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs numba")
@pytest.mark.parametrize(
    "b,h,w,d,r", [(3, 9, 13, 6, 3), (2, 4, 7, 37, 4), (2, 1, 70, 20, 9), (1, 5, 5, 16, 8), (2, 2, 3, 5, 0)]
)
def test_projected_ss2d_scan_matches_reference(b, h, w, d, r):
    """The cpu kernel forms the step sizes from their factors as it scans (eight tokens at a
    time, then one at a time): token counts with every remainder mod 8 (117, 28, 70, 25, 6),
    full and partial blocks of channels, and rank 0 (every raw step size 0) all give the
    reference's result."""
    # bound: float32 vs float64 over <= 70 steps: measured (30 seeds) y <= 3.0e-7 and gradients <= 4.2e-6
    # of max |ref|, >= 20x under 1e-5 / 1e-4
    assert_matches_reference(projected_against_reference(b, 5, r, h, w, d))


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs numba")
def test_cpu_scan_reads_bfloat16_inputs_exactly():
    """bfloat16 inputs are read as the float32 values they stand for: the same output, bit for
    bit, as float32 copies of them, also in low-rank form (the kernel forms the step sizes)."""
    from mambastyle.layers.ss2d import ss2d_scan, ss2d_scan_projected

    b, n, r, h, w, d = 2, 4, 3, 6, 5, 40
    args = {
        "x": torch.randn(b, h * w, d).bfloat16(),
        "dts": (torch.randn(4, d, b, h * w) - 2).bfloat16(),
        "A": -torch.rand(4, d, n) * 4,
        "B": torch.randn(b, 4, n, h * w).bfloat16(),
        "C": torch.randn(b, 4, n, h * w).bfloat16(),
        "D": torch.randn(4, d),
        "dt_bias": torch.randn(4, d),
    }
    got = ss2d_scan(**args, h=h, w=w, backend="cpu")
    want = ss2d_scan(**{k: v.float() for k, v in args.items()}, h=h, w=w, backend="cpu")
    assert got.dtype == torch.float32 and torch.equal(got, want)

    proj = torch.randn(b, h * w, 4, r + 2 * n).bfloat16()
    weight = (torch.randn(4, d, r) / r**0.5).bfloat16().float()
    common = {"A": args["A"], "D": args["D"], "dt_bias": args["dt_bias"], "h": h, "w": w, "backend": "cpu"}
    got = ss2d_scan_projected(args["x"], proj, weight, **common)
    want = ss2d_scan_projected(args["x"].float(), proj.float(), weight, **common)
    assert got.dtype == torch.float32 and torch.equal(got, want)  # step sizes formed in float32 either way
