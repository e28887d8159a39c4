"""GPU checks for a machine with CUDA (the `triton` scan backend needs nothing more; the
`cuda` backend needs mamba-ssm, the `cuda` extra). One short script: about five minutes.

1. Scan agreement: every GPU backend here (`triton`, and `cuda` where mamba-ssm imports) vs
   `ref` on fresh random inputs, forward and all gradients.
2. Scan speed: forward + backward ms of each GPU backend at an SS2D-sized problem (batch 8,
   4 x 384 channels, N 16, L 1024), and the fused SS2D scan (`triton`) against cross-scan
   copies through the plain scan (`cuda`); the triton/cuda ratio (target <= 1.5).
3. SS2D on the GPU with each backend vs `ref`, forward and backward, and the module without
   gradients; SS2D's scan without gradients (the encoders' path): agreement, and ms per call
   at the encoder's first level per backend and per kernel variant (the stepping kernel's
   channel blocks, the output LayerNorm and gate after it or fused into it, the chunked
   kernel).
4. Encoder forward latency, ms/image at batch 1, 8 and 32, fp32 and bf16 autocast:
   mambastyle with each GPU backend, and psp (256x256 input, 1024-px generator), placed as
   the stages load them (channels-last),
   CUDA-synchronised; the psp/mambastyle ratios (target >= 1 at batch 8 and 32).
5. Training steps on the GPU with mixed precision (the params.yaml train section, the
   `mambastyle_small` encoder at 256 px against a 256-px random generator): losses finite,
   steps/s, and the autocast dtype used.
6. The invert stage's actor (`Inverter`, the class Ray Data runs, asked for a GPU) against
   `invert_batch` on the CPU for the same images: the actor's device, codes and metrics (TF32
   off for the comparison), then its images/s on the GPU with the default math settings
   (`mambastyle` encoder, 256-px generator with 512-d W, reconstructions and metrics on).

Exits non-zero if an agreement check fails. Usage: python benchmarks/gpu_check.py [--json out.json]
[--sections scan_vs_ref,ss2d_vs_ref,...] [--profile kernels.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from mambastyle.layers.selective_scan import available_backends, resolve_backend, selective_scan
from mambastyle.layers.ss2d import SS2D
from mambastyle.models.encoders import build_encoder, on_device


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


GPU_BACKENDS = ("triton", "cuda")


def scan_inputs(bt: int, d: int, n: int, length: int, groups: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {
        "u": torch.randn(bt, d, length, generator=g),
        "delta": torch.randn(bt, d, length, generator=g) * 0.5 - 1,
        "A": -torch.rand(d, n, generator=g) * 8,
        "B": torch.randn(bt, groups, n, length, generator=g),
        "C": torch.randn(bt, groups, n, length, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(bt, d, length, generator=g),
        "delta_bias": torch.randn(d, generator=g) * 0.1,
    }


def scan_with_grads(inputs: dict, backend: str, device: str, weight: torch.Tensor):
    xs = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
    y = selective_scan(**xs, delta_softplus=True, backend=backend)
    (y * weight.to(device)).sum().backward()
    return y.detach(), {k: v.grad for k, v in xs.items()}


def check_scan(device: str) -> dict:
    inputs = scan_inputs(2, 256, 16, 2048, 4)
    weight = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1))
    ref = scan_with_grads(inputs, "ref", device, weight)
    out = {}
    for backend in GPU_BACKENDS:
        if backend not in available_backends(device):
            out[backend] = {"skipped": f"{backend} unavailable here"}
            continue
        y, grads = scan_with_grads(inputs, backend, device, weight)
        errs = {"y": rel_err(y, ref[0])} | {f"d{k}": rel_err(grads[k], ref[1][k]) for k in inputs}
        out[backend] = {"relative_errors": errs, "ok": errs["y"] < 1e-3 and max(errs.values()) < 1e-2}
    out["ok"] = all(v.get("ok", True) for v in out.values() if isinstance(v, dict))
    return out


def cuda_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def scan_speed(device: str) -> dict:
    """Forward + backward ms per backend, plain scan and SS2D-shaped."""
    from mambastyle.layers.ss2d import ss2d_scan

    bt, k, d, n, h, w = 8, 4, 384, 16, 32, 32
    inputs = {key: v.to(device) for key, v in scan_inputs(bt, k * d, n, h * w, k).items()}
    # step sizes token-major in memory, as SS2D makes them for `triton` (others copy them into
    # each direction's order anyway)
    ss2d = {"x": torch.randn(bt, h * w, d), "dts": torch.randn(k, bt, h * w, d).permute(0, 3, 1, 2),
            "A": -torch.rand(k, d, n),
            "B": torch.randn(bt, k, n, h * w), "C": torch.randn(bt, k, n, h * w), "D": torch.randn(k, d),
            "dt_bias": torch.randn(k, d) * 0.1}  # fmt: skip
    ss2d = {key: v.to(device) for key, v in ss2d.items()}
    out = {"shape": {"batch": bt, "channels": k * d, "state": n, "length": h * w}}
    for backend in GPU_BACKENDS:
        if backend not in available_backends(device):
            continue
        xs = {key: v.clone().requires_grad_() for key, v in inputs.items()}
        ys = {key: v.clone().requires_grad_() for key, v in ss2d.items()}

        def plain(xs=xs, backend=backend):
            selective_scan(**xs, delta_softplus=True, backend=backend).sum().backward()

        def fused(ys=ys, backend=backend):
            ss2d_scan(**ys, h=h, w=w, backend=backend).sum().backward()

        out[backend] = {"scan_fwd_bwd_ms": cuda_ms(plain), "ss2d_fwd_bwd_ms": cuda_ms(fused)}
        if backend == "triton":
            out["triton_channel_blocks"] = _training_blocks(plain, fused)
            out["triton_ss2d_backward"] = _ss2d_backward_times(fused)
    if "triton" in out and "cuda" in out:
        out["triton_over_cuda"] = {key: out["triton"][key] / out["cuda"][key] for key in out["cuda"]}
    return out


def _ss2d_backward_times(fused) -> dict:
    """SS2D forward + backward ms on `triton` with each backward kernel: stepping (the default:
    a thread per channel, as the forward) and chunked (prefix scans over 32-token chunks)."""
    from mambastyle.layers.selective_scan import _triton_kernels

    kernels = _triton_kernels()
    default = kernels.SS2D_BACKWARD
    times = {}
    try:
        for choice in ("stepping", "chunked"):
            kernels.SS2D_BACKWARD = choice
            times[choice] = cuda_ms(fused)
    finally:
        kernels.SS2D_BACKWARD = default
    return times


def _training_blocks(plain, fused) -> dict:
    """The same forward + backward ms with the chunked kernels' channel blocks capped at 2 and
    4, and with the chunked backward in 8 warps instead of 4 (the default takes the largest
    channel block within their register budget: 8 at N 16, where the backward's compiled loop
    needs 255 registers and spills (`benchmarks/triton_sass.py` counts its local-memory loads
    and stores); at 4 it needs 168, but the atomic adds of the B/C gradients, one set per
    block, double; 8 warps hold the same block in 176 registers, with more cross-warp sums).
    SS2D's default backward is the stepping kernel, which none of these touch."""
    from mambastyle.layers.selective_scan import _triton_kernels

    kernels = _triton_kernels()
    default, launch = kernels._blocks, kernels._launch
    times = {}
    for cap in (2, 4):

        def capped(dk, ns, cpg, cap=cap):
            block_d, block_n, _ = default(dk, ns, cpg)
            block_d = min(block_d, cap)
            return block_d, block_n, cpg % block_d == 0

        kernels._blocks = capped
        try:
            times[f"block_d<={cap}"] = {"scan_fwd_bwd_ms": cuda_ms(plain), "ss2d_fwd_bwd_ms": cuda_ms(fused)}
        finally:
            kernels._blocks = default

    def wider(kernel, grid, tensors, sizes, strides, **flags):
        if kernel is kernels._scan_bwd:
            flags = {**flags, "num_warps": 8}
        launch(kernel, grid, tensors, sizes, strides, **flags)

    kernels._launch = wider
    try:
        times["backward_8_warps"] = {"scan_fwd_bwd_ms": cuda_ms(plain)}
    finally:
        kernels._launch = launch
    return times


def check_ss2d(device: str) -> dict:
    torch.manual_seed(0)
    m = SS2D(64, d_state=16).to(device)
    x = torch.randn(2, 16, 16, 64, device=device)
    weight = torch.randn_like(x)
    results = {}
    for backend in ("ref", *GPU_BACKENDS):
        if backend != "ref" and backend not in available_backends(device):
            continue
        m.scan_backend = backend
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * weight).sum().backward()
        with torch.no_grad():  # the encoders' path (fused with the output gate on triton)
            y_infer = m(x)
        results[backend] = [y.detach(), y_infer, xi.grad, *(p.grad.clone() for p in m.parameters())]
    out = {}
    for backend, got in results.items():
        if backend != "ref":
            errs = [rel_err(a, b) for a, b in zip(got, results["ref"], strict=True)]
            out[backend] = {
                "y": errs[0],
                "y_without_grad": errs[1],
                "max_grad": max(errs[2:]),
                "ok": max(errs[:2]) < 1e-3 and max(errs) < 1e-2,
            }
    out["auto"] = resolve_backend("auto", device)
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


@torch.no_grad()
def ss2d_inference(device: str) -> dict:
    """SS2D's scan without gradients, as the encoders run it: each backend, the projected form
    and the stepping kernel against the float64 reference on a small map, then ms per call at
    the encoder's first level (d 1024, N 16, 64x64 tokens, bf16 inputs as under autocast) for
    the projected scan on each GPU backend, the stepping kernel per channel block, with the
    output LayerNorm and gate after it and fused into it, and the chunked (training) kernel."""
    from mambastyle.layers.ss2d import ss2d_scan, ss2d_scan_projected

    out = {}
    g = torch.Generator().manual_seed(2)
    b, d, n, h, w = 2, 96, 16, 20, 12
    small = {"x": torch.randn(b, h * w, d, generator=g), "dts": torch.randn(4, d, b, h * w, generator=g),
             "A": -torch.rand(4, d, n, generator=g) * 8, "B": torch.randn(b, 4, n, h * w, generator=g),
             "C": torch.randn(b, 4, n, h * w, generator=g), "D": torch.randn(4, d, generator=g),
             "dt_bias": torch.randn(4, d, generator=g) * 0.1}  # fmt: skip
    want = ss2d_scan(**{k: v.double().to(device) for k, v in small.items()}, h=h, w=w, backend="ref")
    r = 6
    low = {"x": small["x"], "proj": torch.randn(b, h * w, 4, r + 2 * n, generator=g),
           "dt_weight": torch.randn(4, d, r, generator=g) / r**0.5,
           **{k: small[k] for k in ("A", "D", "dt_bias")}}  # fmt: skip
    want_low = ss2d_scan_projected(
        **{k: v.double().to(device) for k, v in low.items()}, h=h, w=w, backend="ref"
    )
    errs = {}
    for backend in GPU_BACKENDS:
        if backend in available_backends(device):
            got = ss2d_scan(**{k: v.to(device) for k, v in small.items()}, h=h, w=w, backend=backend)
            errs[backend] = rel_err(got, want)
            got = ss2d_scan_projected(**{k: v.to(device) for k, v in low.items()}, h=h, w=w, backend=backend)
            errs[f"projected[{backend}]"] = rel_err(got, want_low)
    if "triton" in available_backends(device):  # the stepping kernel with one-warp programs too
        from mambastyle.layers.selective_scan import _triton_kernels

        xs = {k: v.to(device) for k, v in small.items()}
        got = _triton_kernels().ss2d_infer(
            xs["x"], xs["dts"], xs["dt_bias"], xs["A"], xs["B"], xs["C"], h, w, 32
        )
        errs["stepping[triton]"] = rel_err(got + xs["x"] * xs["D"].sum(0), want)
    out["relative_errors_vs_ref"] = errs
    out["ok"] = max(errs.values()) < 1e-4
    for b in (1, 8, 32):
        out[f"batch_{b}_ms"] = _ss2d_times(device, b)
        torch.cuda.empty_cache()
    out["projection_ms"] = _projection_times(device)
    out["vss_block_ms"] = _vss_block_times(device)
    return out


def _vss_block_times(device: str, b: int = 32, side: int = 64, c: int = 512) -> dict:
    """ms of a VSS block at the encoder's first level (batch 32, bf16 autocast, no gradients)
    per scan backend, its LayerNorms as Triton passes (the default on GPUs) and as PyTorch's."""
    from mambastyle.layers.ss2d import VSSBlock

    x = torch.randn(b, c, side, side, device=device).contiguous(memory_format=torch.channels_last)
    x = x.permute(0, 2, 3, 1)  # (B, H, W, C) as the encoder passes it
    times = {}
    for backend in GPU_BACKENDS:
        if backend not in available_backends(device):
            continue
        block = VSSBlock(c, d_state=16, scan_backend=backend).to(device).eval()

        def run(block=block):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                block(x)

        times[f"fused_norms[{backend}]"] = cuda_ms(run)
        block._fused_norms = lambda x: False
        times[f"pytorch_norms[{backend}]"] = cuda_ms(run)
    return times


def _projection_times(device: str, b: int = 32, side: int = 64, c: int = 512, d: int = 1024) -> dict:
    """ms of SS2D's in_proj at the encoder's first level (batch 32, channels-last map) as
    ``F.linear`` and as a 1x1 convolution, fp32 with PyTorch's default math settings (TF32
    allowed for convolutions, not for matmuls: ``token_linear`` takes the convolution there)
    and bf16 (``token_linear`` takes ``F.linear``)."""
    F = torch.nn.functional
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(b, side, side, c, device=device, dtype=dtype)
        weight = torch.randn(2 * d, c, device=device, dtype=dtype) / c**0.5
        name = str(dtype).removeprefix("torch.")
        times[f"linear[{name}]"] = cuda_ms(lambda x=x, weight=weight: F.linear(x, weight))
        times[f"conv1x1[{name}]"] = cuda_ms(
            lambda x=x, weight=weight: F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None]).permute(
                0, 2, 3, 1
            )
        )
    return times


def _ss2d_times(device: str, b: int, d: int = 1024, n: int = 16, r: int = 32, h: int = 64, w: int = 64):
    from mambastyle.layers.selective_scan import _triton_kernels
    from mambastyle.layers.ss2d import _step_sizes, ss2d_scan_projected

    kernels = _triton_kernels()
    x = torch.randn(b, h * w, d, device=device, dtype=torch.bfloat16)
    proj = torch.randn(b, h * w, 4, r + 2 * n, device=device, dtype=torch.bfloat16)
    weight = torch.randn(4, d, r, device=device) / r**0.5
    A = -torch.rand(4, d, n, device=device) * 8
    D, bias = torch.randn(4, d, device=device), torch.randn(4, d, device=device) * 0.1
    times = {}
    for backend in GPU_BACKENDS:
        if backend in available_backends(device):
            times[f"projected[{backend}]"] = cuda_ms(
                lambda backend=backend: ss2d_scan_projected(x, proj, weight, A, D, bias, h, w, backend)
            )
    dts = _step_sizes(weight.bfloat16(), proj, token_major=True)
    B, C = proj[..., r : r + n].permute(0, 2, 3, 1), proj[..., r + n :].permute(0, 2, 3, 1)
    for block in (32, 64, 128):
        times[f"stepping[block_d={block}]"] = cuda_ms(
            lambda block=block: kernels.ss2d_infer(x, dts, bias, A, B, C, h, w, block)
        )
    norm = torch.nn.LayerNorm(d, device=device)
    z = torch.randn(b, h, w, d, device=device, dtype=torch.bfloat16)

    def unfused():
        y = kernels.ss2d_infer(x, dts, bias, A, B, C, h, w) + x * D.sum(0)
        return norm(y.view(b, h, w, d)).to(z.dtype) * torch.nn.functional.silu(z)

    times["stepping, then LayerNorm and gate"] = cuda_ms(unfused)
    times["stepping with LayerNorm and gate fused"] = cuda_ms(
        lambda: kernels.ss2d_infer_gated(
            x, dts, bias, A, B, C, h, w, D.sum(0), norm.weight, norm.bias, norm.eps, z
        )
    )
    dts, B, C = _step_sizes(weight.bfloat16(), proj), B.contiguous(), C.contiguous()
    times["chunked"] = cuda_ms(lambda: kernels.SS2DScan.apply(x, dts, bias, A, B, C, h, w))
    times["default_block_d"] = kernels._infer_block(d)
    return times


def gpu_encoders(device: str) -> list[tuple[str, str, str]]:
    """(label, encoder name, scan backend): psp, then mambastyle once per GPU scan backend here."""
    mamba = [(f"mambastyle[{b}]", "mambastyle", b) for b in GPU_BACKENDS if b in available_backends(device)]
    return [("psp", "psp", "auto"), *mamba]


def placed_encoder(name: str, backend: str, device: str) -> torch.nn.Module:
    """A 1024-px generator's encoder with random weights, placed as the stages place them."""
    return on_device(build_encoder(name, 1024, seed=0, scan_backend=backend), device).eval()


@torch.no_grad()
def encoder_latency(device: str) -> dict:
    """ms/image per encoder (mambastyle once per GPU scan backend), batch and precision."""
    out = {}
    for label, name, backend in gpu_encoders(device):
        enc = placed_encoder(name, backend, device)
        out[label] = {}
        for precision in ("fp32", "bf16"):
            for batch in (1, 8, 32):
                x = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    ms = cuda_ms(lambda enc=enc, x=x: enc(x), repeats=10)
                out[label][f"{precision}_b{batch}_ms_per_image"] = ms / batch
        del enc
        torch.cuda.empty_cache()
    ratios = {}
    for label in out:
        if label.startswith("mambastyle"):
            ratios[label] = {key: out["psp"][key] / out[label][key] for key in out[label]}
    out["psp_over_mambastyle"] = ratios
    return out


def train_steps(device: str, steps: int = 20) -> dict:
    import dataclasses

    from mambastyle.config import load_params
    from mambastyle.models.stylegan2 import GeneratorConfig, build_generator
    from mambastyle.train.loop import Trainer
    from mambastyle.train.losses import build_loss

    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    train = dataclasses.replace(p.train, encoder="mambastyle_small", input_size=256, batch_size=8,
                                synthetic_ratio=1.0, amp=True, steps=steps)  # fmt: skip
    g = build_generator(GeneratorConfig(resolution=256, channel_multiplier=2), seed=0).to(device)
    g.requires_grad_(False).eval().compute_latent_avg(2000)
    enc = build_encoder(train.encoder, 256, seed=0, input_size=256).to(device)
    enc.set_latent_avg(g.latent_avg)
    loss, _ = build_loss(train.loss, train.pretrained)
    trainer = Trainer(enc, g, loss, train, device=device)
    metrics = [trainer.train_step() for _ in range(3)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics += [trainer.train_step() for _ in range(steps - 3)]
    torch.cuda.synchronize()
    totals = [m["loss/total"] for m in metrics]
    return {
        "ok": all(map(lambda v: v == v and abs(v) != float("inf"), totals)) and trainer.nonfinite == 0,
        "amp_dtype": str(trainer.amp_dtype),
        "steps_per_s": (steps - 3) / (time.perf_counter() - t0),
        "loss_first_last": [totals[0], totals[-1]],
    }


def invert_actor(device: str, n: int = 32, timed: int = 512) -> dict:
    import tempfile

    import numpy as np

    from mambastyle.checkpoints import save_encoder
    from mambastyle.config import GeneratorParams, SampleParams
    from mambastyle.generate import resolve_generator
    from mambastyle.invert.pipeline import Inverter, InvertJob
    from mambastyle.models.inversion import invert_batch
    from mambastyle.models.stylegan2 import GeneratorConfig
    from mambastyle.storage import StorageOptions

    arch = GeneratorConfig(resolution=256)
    gp = GeneratorParams(checkpoint=None, architecture=arch, init_seed=0, latent_avg_samples=4096,
                         sample=SampleParams(seed=0, num=1, truncation=1.0, noise_mode="const"))  # fmt: skip
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (timed, 256, 256, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        enc = build_encoder("mambastyle", arch.resolution, seed=0).eval()
        gen = resolve_generator(None, arch, 0, gp.latent_avg_samples, "cpu")
        enc.set_latent_avg(gen.latent_avg)
        save_encoder(enc, f"{tmp}/enc.pt")
        job = InvertJob(root=tmp, encoder=f"{tmp}/enc.pt", out=f"{tmp}/latents", options=StorageOptions(),
                        generator=gp, batch_size=16, num_actors=1, use_gpu=True, row_group_size=1024,
                        rows_per_file=100_000, metadata={"run_id": "gpu-check"})  # fmt: skip
        actor = Inverter(job)

        def batch(lo: int, hi: int) -> dict:
            keys = [f"k{i}" for i in range(lo, hi)]
            return {"png": images[lo:hi], "json": [{"split": "train"}] * len(keys), "__key__": keys,
                    "__url__": ["gpu-check.tar"] * len(keys)}  # fmt: skip

        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        got = actor(batch(0, n))
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        ref = invert_batch(enc, torch.from_numpy(images[:n]), gen, None, 16)
        w = np.stack(got.column("w_plus").to_numpy(zero_copy_only=False)).reshape(ref.w_plus.shape)
        errs = {"w_plus": rel_err(torch.from_numpy(w), torch.from_numpy(ref.w_plus))}
        for name in ("mse", "ssim"):
            errs[name] = rel_err(
                torch.tensor(got.column(name).to_numpy()), torch.from_numpy(getattr(ref, name))
            )
        actor(batch(0, min(64, timed)))  # warm-up with the default settings
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = sum(actor(batch(lo, min(lo + 256, timed))).num_rows for lo in range(0, timed, 256))
        rate = rows / (time.perf_counter() - t0)
    return {
        "actor_device": str(actor.device),
        "relative_errors": errs,
        "images_per_s_with_reconstructions": rate,
        "ok": actor.device.type == "cuda" and max(errs.values()) < 1e-3,
    }


@torch.no_grad()
def encoder_profile(device: str, batch: int = 32) -> dict:
    """Where each encoder's GPU time goes: the profiler's top kernels by self CUDA time for one
    bf16-autocast forward at ``batch`` (after warm-up), per encoder and scan backend."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label, name, backend in gpu_encoders(device):
        enc = placed_encoder(name, backend, device)
        x = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                enc(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                enc(x)
                torch.cuda.synchronize()
        averages = prof.key_averages()
        out[label] = averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90)
        del enc
        torch.cuda.empty_cache()
    return out


SECTIONS = {
    "scan_vs_ref": check_scan,
    "scan_speed": scan_speed,
    "ss2d_vs_ref": check_ss2d,
    "ss2d_inference": ss2d_inference,
    "encoder_latency": encoder_latency,
    "train_steps_amp": train_steps,
    "invert_actor": invert_actor,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset")
    parser.add_argument("--profile", help="also write the encoders' top GPU kernels (batch 32, bf16) here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    device = "cuda"
    chosen = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "backends": available_backends(device)}  # fmt: skip
    for name in chosen:
        t0 = time.perf_counter()
        try:
            report[name] = SECTIONS[name](device)
        except Exception as exc:  # one broken section must not lose the others' figures
            traceback.print_exc()
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report[name]["seconds"] = time.perf_counter() - t0
        print(name, json.dumps(report[name], indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.profile:
        try:
            tables = encoder_profile(device)
            Path(args.profile).write_text("".join(f"== {k}\n{table}\n" for k, table in tables.items()))
        except Exception:
            traceback.print_exc()
    failed = [k for k in report if isinstance(report[k], dict) and report[k].get("ok") is False]
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
