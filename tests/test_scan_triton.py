"""The `triton` scan backend's kernels in Triton's interpreter, against the `ref` backend.

The interpreter runs the same kernel code as the GPU, one program after another on CPU
tensors, and steps its prefix scans element by element: sizes here are small, and lengths
are chosen to span several BLOCK_T-step chunks with a partial last one. On a GPU machine,
benchmarks/gpu_check.py compares the compiled kernels with `ref` and mamba-ssm.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_selective_scan import assert_close_rel, make_inputs, run
from test_ss2d import assert_matches_reference, projected_against_reference, ss2d_against_reference

from mambastyle.layers import selective_scan as scan_module
from mambastyle.layers.selective_scan import available_backends, resolve_backend, selective_scan
from mambastyle.layers.ss2d import SS2D, VSSBlock

KERNELS = "mambastyle.layers._scan_triton"


def _forget_triton() -> None:
    """Drops Triton's Python modules (not its compiled extension) and the kernels, so that the
    next import defines every kernel, Triton's own library functions included, afresh."""
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.") or m == KERNELS]:
        if not name.startswith("triton._C"):
            del sys.modules[name]
    scan_module._triton_kernels.cache_clear()


@pytest.fixture(scope="module")
def interpreted():
    """The kernels imported afresh with TRITON_INTERPRET=1 (Triton reads it when a kernel or
    one of its library functions is defined); afterwards the next import is a fresh one again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        _forget_triton()
        pytest.importorskip("triton")
        kernels = importlib.import_module(KERNELS)
        assert "triton" in available_backends("cpu")
        yield kernels
    _forget_triton()


def test_interpreter_is_never_chosen_automatically(interpreted):
    assert resolve_backend("auto", "cpu") in ("cpu", "ref")


@pytest.mark.parametrize(
    "shape,flags",
    [
        # several chunks with a partial last one; groups; everything fused in
        ({"bt": 2, "d": 4, "n": 3, "length": 45, "groups": 2}, {"delta_softplus": True}),
        # no z, no D, no bias, no softplus; B/C without a group dim; length < one chunk
        ({"bt": 1, "d": 3, "n": 4, "length": 7, "groups": 0}, {"drop": ("z", "D", "delta_bias")}),
        # exactly two chunks; softplus without bias; z without D
        (
            {"bt": 1, "d": 4, "n": 2, "length": 64, "groups": 1},
            {"delta_softplus": True, "drop": ("delta_bias", "D")},
        ),  # fmt: skip
        # a group of 5 channels: blocks span groups (per-element gradient atomics); odd state size
        ({"bt": 1, "d": 10, "n": 3, "length": 33, "groups": 2}, {"delta_softplus": True, "drop": ("z",)}),
        ({"bt": 2, "d": 2, "n": 1, "length": 1, "groups": 1}, {"delta_softplus": True}),
    ],
)
def test_scan_forward_and_gradients_match_reference(interpreted, shape, flags):
    inputs = make_inputs(**shape)
    for name in flags.get("drop", ()):
        del inputs[name]
    softplus = flags.get("delta_softplus", False)
    if not softplus:  # step sizes are positive in any model; negative ones make the state grow
        inputs["delta"] = torch.nn.functional.softplus(inputs["delta"])
    bt, d, length = inputs["u"].shape
    weights = (torch.randn(bt, d, length, dtype=torch.float64),
               torch.randn(bt, d, inputs["A"].shape[1], dtype=torch.float64))  # fmt: skip
    ref = run(inputs, "ref", loss_weights=weights, delta_softplus=softplus)
    got = run(inputs, "triton", dtype=torch.float32, loss_weights=weights, delta_softplus=softplus)
    # bound: float32 against float64 over <= 64 steps: measured (20 seeds) y <= 4.4e-7, state
    # <= 5.7e-7, gradients <= 1.4e-6 of max |ref|; 1e-5 and 1e-4 leave >= 17x
    assert_close_rel(got[0], ref[0], 1e-5, "y")
    assert_close_rel(got[1], ref[1], 1e-5, "last state")
    for k in inputs:
        assert_close_rel(got[2][k], ref[2][k], 1e-4, f"d{k}")


def test_scan_only_last_state_needs_gradient(interpreted):
    # The output unused: backward gets no dy, only the last state's gradient.
    inputs = make_inputs(bt=1, d=2, n=2, length=40, groups=1)
    inputs = {k: v.float().requires_grad_() for k, v in inputs.items()}
    _, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    last.sum().backward()
    grads = {k: v.grad.clone() for k, v in inputs.items()}
    for v in inputs.values():
        v.grad = None
    _, last_ref = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="ref")
    last_ref.sum().backward()
    for k, v in inputs.items():
        if v.grad is None:  # z and D do not reach the state
            assert not grads[k].any(), f"d{k} should be zero"
            continue
        # bound: float32 both sides, different summation order over 40 steps: measured (20 seeds)
        # <= 1.5e-6, 7x under
        assert_close_rel(grads[k].double(), v.grad.double(), 1e-5, f"d{k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_precision_inputs(interpreted, dtype):
    # State in float32: the output is the exact scan of the rounded inputs, rounded once.
    inputs = {k: v.to(dtype) for k, v in make_inputs(bt=1, d=4, n=3, length=37, groups=2).items()}
    y = selective_scan(**inputs, delta_softplus=True, backend="triton")
    assert y.dtype == dtype
    want = selective_scan(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True, backend="ref")
    # bound: one conversion of the float32 result to the input dtype, which is off by less than
    # one unit in the last place (finfo.eps relative; the GPU rounds to nearest, half that,
    # Triton's interpreter truncates), plus float32 noise ~1e-7: measured (20 seeds) <= 0.82 eps
    # for bf16, 0.33 eps for fp16
    assert_close_rel(y.double(), want, 1.05 * torch.finfo(dtype).eps, "y")


@pytest.mark.parametrize(
    "b,n,h,w,d",
    [
        (1, 2, 3, 5, 4),
        (1, 2, 1, 37, 3),
        (1, 2, 6, 7, 2),
        # two images, two of the forward's 64-channel blocks (the last partial), three chunks
        # of the backward (the last partial): the chunk states' batch, channel and chunk offsets
        (2, 3, 9, 8, 66),
    ],
)
@pytest.mark.parametrize("backward", ["stepping", "chunked"])
def test_fused_ss2d_matches_cross_scan_reference(interpreted, monkeypatch, backward, b, n, h, w, d):
    monkeypatch.setattr(interpreted, "SS2D_BACKWARD", backward)
    (ref_y, ref_g), (got_y, got_g) = ss2d_against_reference("triton", b, n, h, w, d)
    # bound: float32 against float64 over <= 72 steps per direction: measured (20 seeds; the
    # two-image case 6) y <= 3.6e-7, gradients <= 1.6e-6 of max |ref| (chunked backward), 2.9e-6
    # (stepping); 1e-5 and 1e-4 leave >= 28x
    assert_close_rel(got_y, ref_y, 1e-5, "y")
    for k in ref_g:
        assert_close_rel(got_g[k], ref_g[k], 1e-4, f"d{k}")


@pytest.mark.parametrize("backward", ["stepping", "chunked"])
@pytest.mark.parametrize("b,h,w,d,r", [(2, 5, 7, 6, 3), (1, 9, 8, 34, 4)])
def test_projected_ss2d_on_triton_matches_reference(interpreted, monkeypatch, backward, b, h, w, d, r):
    # SS2D's own path: step sizes formed token-major from their factors, read in place by the
    # forward and by either backward kernel; gradients reach the factors and dt_weight.
    monkeypatch.setattr(interpreted, "SS2D_BACKWARD", backward)
    # bound: float32 vs float64 over <= 72 steps: measured (20 seeds; the 34-channel case 8)
    # y <= 3.2e-7 and gradients <= 2.3e-6 of max |ref|, >= 31x under 1e-5 / 1e-4
    assert_matches_reference(projected_against_reference(b, 3, r, h, w, d, backend="triton"))


@pytest.mark.parametrize(
    "d_model,expand,n,side,autocast",
    [
        (8, 1.0, 2, (3, 4), False),
        (8, 1.5, 3, (5, 3), False),  # 12 channels: a LayerNorm row narrower than its block
        (6, 2.0, 4, (4, 4), True),  # bf16 autocast: the gate's output in bf16
    ],
)
def test_ss2d_module_on_triton_matches_ref(interpreted, monkeypatch, d_model, expand, n, side, autocast):
    # Without gradients the module runs the scan, its output LayerNorm and the gate fused on
    # `triton`; with them (and on `ref`), the scan and then PyTorch's LayerNorm and gate.
    block = SS2D(d_model, d_state=n, expand=expand, scan_backend="triton")
    with torch.no_grad():  # a trained LayerNorm and skip term, not their identity init
        block.out_norm.weight.normal_()
        block.out_norm.bias.normal_()
        block.Ds.normal_()
    fused = []
    gated = interpreted.ss2d_infer_gated
    monkeypatch.setattr(interpreted, "ss2d_infer_gated", lambda *a: fused.append(1) or gated(*a))
    x = torch.randn(2, *side, d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            got = block(x)
        assert fused == [1]
        with_grad = block(x)  # the unfused path on triton
        block.scan_backend = "ref"
        with torch.no_grad():
            want = block(x)
    assert fused == [1] and got.dtype == want.dtype == with_grad.dtype
    if autocast:
        # bound: the projections' bf16 products are the same on both sides; the unfused gate
        # rounds the LayerNorm output, silu(z) and their product to bf16 (2**-8 relative each),
        # the fused one each direction's scan output and its result, and out_proj's output is
        # rounded to bf16: measured (20 seeds) <= 0.0113 of max |ref| (three bf16 units; the
        # same with the directions' outputs in float32), 2.6x under
        bound = 0.03
    else:
        # bound: float32 both sides, different summation order: measured (20 seeds) <= 3.6e-7,
        # 28x under
        bound = 1e-5
    assert_close_rel(got.double(), want.double(), bound, "SS2D output, fused")
    assert_close_rel(with_grad.detach().double(), want.double(), bound, "SS2D output, with gradients")


@pytest.mark.parametrize(
    "dim,layout,autocast",
    [
        (8, "channels_last", False),  # rows contiguous, as the encoders' maps are
        (12, "nchw", False),  # rows strided (a (B, C, H, W) map's view); a row narrower than its block
        (6, "channels_last", True),  # bf16 autocast: ln_1 writes bf16, the output is float32
    ],
)
def test_vss_block_norms_fused_on_triton_match_ref(interpreted, monkeypatch, dim, layout, autocast):
    # Without gradients on `triton` both LayerNorms run as one Triton pass each, the residual
    # formed inside the second; with gradients (and on `ref`) the block runs as PyTorch modules.
    block = VSSBlock(dim, d_state=3, scan_backend="triton")
    with torch.no_grad():  # trained norms and residual scale, not their identity init
        for p in (block.ln_1.weight, block.ln_1.bias, block.norm.weight, block.norm.bias, block.skip_scale):
            p.normal_()
    calls = []
    fused = interpreted.scaled_add_norm
    monkeypatch.setattr(interpreted, "scaled_add_norm", lambda *a, **k: calls.append(k) or fused(*a, **k))
    grid = torch.randn(2, dim, 5, 4)
    if layout == "channels_last":
        grid = grid.contiguous(memory_format=torch.channels_last)
    x = grid.permute(0, 2, 3, 1)  # (B, H, W, C) as MambaStyleEncoder._vss passes it
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            got = block(x)
        assert len(calls) == 2 and "residual" in calls[1]
        with_grad = block(x)
        block.self_attention.scan_backend = "ref"
        with torch.no_grad():
            want = block(x)
    assert len(calls) == 2 and got.dtype == want.dtype == with_grad.dtype and got.shape == x.shape
    # bound: float32 norms over <= 12 channels in another order, and the SS2D's own difference
    # (its fused gate: three bf16 units of its output under autocast, which the output norm
    # rescales): measured (20 seeds) <= 2.7e-7 in float32 (37x under), 0.0146 under autocast
    # (2x under; the unfused path with gradients: 3.7e-4)
    bound = 0.03 if autocast else 1e-5
    assert_close_rel(got.double(), want.double(), bound, "VSS block, fused norms")
    assert_close_rel(with_grad.detach().double(), want.double(), bound, "VSS block, with gradients")
    # Norms and residual scale frozen, the input without gradients, the SS2D trained: the
    # block still needs its autograd path (the Triton norms have no backward).
    block.self_attention.scan_backend = "triton"
    for p in (block.ln_1.weight, block.ln_1.bias, block.norm.weight, block.norm.bias, block.skip_scale):
        p.requires_grad_(False)
    block(x).sum().backward()
    assert len(calls) == 2 and block.self_attention.in_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "h,w,d,n,block_d,dtype",
    [
        (3, 5, 4, 3, None, torch.float32),  # the default block; 3 states in a block of 4
        (1, 9, 5, 4, 2, torch.float32),  # several channel blocks, the last one partial; N a power of 2
        (7, 2, 3, 4, 4, torch.bfloat16),  # a block wider than the channels; bf16 inputs
        (4, 4, 6, 1, 4, torch.float32),
        (5, 1, 6, 5, 4, torch.float32),  # one column; 5 states in a block of 8
        (3, 3, 40, 8, None, torch.bfloat16),  # more channels than one default block
    ],
)
def test_ss2d_inference_kernel_matches_reference(interpreted, h, w, d, n, block_d, dtype):
    # Without gradients SS2D steps through the tokens, with step sizes token-major in memory
    # and B/C strided views of the projections, as ss2d_scan_projected passes them.
    from mambastyle.layers.ss2d import ss2d_scan

    b, length = 2, h * w
    inputs = {
        "x": torch.randn(b, length, d),
        "dts": torch.randn(4, d, b, length) * 2,
        "A": -torch.rand(4, d, n) * 8,
        "B": torch.randn(b, 4, n, length),
        "C": torch.randn(b, 4, n, length),
        "D": torch.randn(4, d),
        "dt_bias": torch.randn(4, d),
    }
    for key in ("x", "dts", "B", "C"):
        inputs[key] = inputs[key].to(dtype)
    want = ss2d_scan(**{k: v.double() for k, v in inputs.items()}, h=h, w=w, backend="ref")
    dts = inputs["dts"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    bc = torch.cat([inputs["B"], inputs["C"]], dim=2).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert dts.shape == inputs["dts"].shape and not dts.is_contiguous()
    B, C = bc[:, :, :n], bc[:, :, n:]
    y = interpreted.ss2d_infer(inputs["x"], dts, inputs["dt_bias"], inputs["A"], B, C, h, w, block_d=block_d)
    assert y.dtype == torch.float32 and y.shape == (b, length, d)
    # bound: float32 steps against float64 over <= 16 steps per direction (the D term is added
    # outside the kernel): measured (20 seeds) <= 4e-7 of max |ref|, 25x under
    assert_close_rel(y.double() + inputs["x"].double() * inputs["D"].double().sum(0), want, 1e-5, "y")
    with torch.no_grad():
        via_module = ss2d_scan(**{**inputs, "dts": dts}, h=h, w=w, backend="triton")
    assert_close_rel(via_module.double(), want, 1e-5, "ss2d_scan without gradients")


def test_softplus_keeps_small_step_sizes_digits(interpreted):
    # Trained Mamba layers have step sizes of 1e-3..1e-1 (raw values about -7..-2): log(1 + e)
    # as written rounds 1 + e and loses them (all of them below raw -17).
    import triton
    import triton.language as tl

    @triton.jit
    def softplus_of(x_ptr, y_ptr, count, fn: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < count
        tl.store(y_ptr + i, fn(tl.load(x_ptr + i, mask=m, other=0.0)), mask=m)

    x = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([-88.0, -1e-3, 0.0, 1e-3, 88.0])])
    y = torch.empty_like(x)
    softplus_of[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), interpreted._softplus, BLOCK=1024)
    want = torch.nn.functional.softplus(x.double())
    rel = (y.double() - want).abs() / want
    # bound: exp's argument rounds to float32 (2**-24 of |x| log2(e), relative error of
    # exp(-|x|)) and the series adds a few units in the last place: measured 5.4e-7 on
    # [-10, 5], 1.8e-6 on [-30, -10] (log(1 + exp(x)) as written: 1.0, at x = -30)
    typical = (x >= -10) & (x <= 5)
    assert rel[typical].max() < 1e-6
    assert rel.max() < 3e-6


def test_scans_keep_small_step_sizes(interpreted):
    # The same end to end: raw step sizes of trained layers, each triton path against float64.
    from mambastyle.layers.ss2d import ss2d_scan

    b, h, w, d, n = 2, 5, 7, 6, 4
    length = h * w
    inputs = {
        "x": torch.randn(b, length, d),
        "dts": torch.rand(4, d, b, length) * -4.6 - 2.3,  # step sizes 1e-3..1e-1
        "A": -torch.rand(4, d, n) * 8,
        "B": torch.randn(b, 4, n, length),
        "C": torch.randn(b, 4, n, length),
        "D": torch.zeros(4, d),
        "dt_bias": torch.zeros(4, d),
    }
    want = ss2d_scan(**{k: v.double() for k, v in inputs.items()}, h=h, w=w, backend="ref")
    with torch.no_grad():
        inferred = ss2d_scan(**inputs, h=h, w=w, backend="triton")
    trained = ss2d_scan(
        **{k: v.clone().requires_grad_() for k, v in inputs.items()}, h=h, w=w, backend="triton"
    )
    u, delta = torch.randn(2, 8, 45), torch.rand(2, 8, 45) * -4.6 - 2.3
    A, B, C = -torch.rand(8, n) * 8, torch.randn(2, 1, n, 45), torch.randn(2, 1, n, 45)
    want_plain = selective_scan(
        *(t.double() for t in (u, delta, A, B, C)), delta_softplus=True, backend="ref"
    )
    plain = selective_scan(u, delta, A, B, C, delta_softplus=True, backend="triton")
    # bound: float32 against float64: measured (20 seeds) <= 3.7e-7 of max |ref| with the series
    # (1.4e-6 with log(1 + exp) as written, and more through the GPU's approximate log2)
    for got, ref, name in (
        (inferred, want, "inference"),
        (trained, want, "training"),
        (plain, want_plain, "plain"),
    ):
        assert_close_rel(got.detach().double(), ref, 1e-6, name)


def test_stepping_kernels_need_no_communication(tmp_path):
    # The stepping kernel's speed (SS2D's forward, for inference and for training) rests on its
    # layout: a thread owns whole channels, so a step needs no warp shuffles or barriers
    # (states spread over threads needed 4 shuffle rounds and a shared-memory round trip per
    # step; a store of chunk states vectorised along channels spread them that way again).
    # Compiled for sm_90 exactly as a launch would be, on this machine: Triton's wheel brings
    # ptxas and cuobjdump.
    import triton.backends.nvidia as nvidia

    if not (Path(nvidia.__file__).parent / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no cuobjdump")
    out = tmp_path / "sass.json"
    script = Path(__file__).parents[1] / "benchmarks" / "triton_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(script), "--json", str(out)], check=True, env=env, timeout=600)
    kernels = json.loads(out.read_text())["kernels"]
    for label in ("stepping (inference)", "stepping with chunk states (SS2D training forward)"):
        loop = kernels[label]["loop"]
        assert loop.get("SHFL", 0) == 0 and loop.get("BAR", 0) == 0, (label, loop)
        # per token: an exp2 per state and lane (16 states per thread here), softplus' exp2
        # and reciprocal
        tokens = kernels[label]["tokens_per_iteration"]
        assert 16 * tokens <= loop["MUFU"] <= 20 * tokens, (label, loop)
        chunked = kernels["chunked forward (plain scan, training)"]["per_32_updates"]
        assert kernels[label]["per_32_updates"] < chunked / 2, label
    # SS2D's stepping backward: a thread's channel as in the forward, only the sums over
    # channels (dB, dC: 16 states each over 32 lanes, 5 shuffle rounds) cross threads; per
    # token an exp2 per state and lane in each of its two walks, and softplus' two. Its
    # instructions per update: 54.5-55 against the chunked backward's 106 (Triton 3.8) to 149
    # (3.6, the GPU image's)
    backward = kernels["stepping backward (SS2D training)"]
    assert backward["loop"].get("SHFL", 0) <= 2 * 16 * 5, backward["loop"]
    assert 2 * 16 <= backward["loop"]["MUFU"] <= 2 * 20, backward["loop"]
    chunked = kernels["chunked backward (SS2D training)"]["per_32_updates"]
    assert backward["per_32_updates"] < chunked / 1.5, (backward["per_32_updates"], chunked)
    for label in ("merge, LayerNorm and gate (inference)", "residual LayerNorm (VSS block, inference)"):
        assert kernels[label]["registers"] > 0, label  # it compiled too
    # Nothing SS2D runs by default spills registers to local memory (the chunked backward, 255
    # registers at its default block, does: gpu_check times it with smaller blocks and 8 warps)
    for label, report in kernels.items():
        if not label.startswith("chunked"):
            assert report["local"] == 0, (label, report)
