"""GPU checks for a machine with CUDA (and, for the `cuda` scan backend, the `cuda` extra).

1. `cuda` scan backend (mamba-ssm) vs `ref` on fresh random inputs, forward and gradients
   (skipped with a message when mamba-ssm is not importable).
2. SS2D on the GPU (whatever backend `auto` picks there) vs `ref`, forward.
3. Encoder forward latency on the GPU, batch 1 and 8, mambastyle vs psp (256x256 input,
   1024-px generator), CUDA-synchronised.
4. Training steps on the GPU with mixed precision (the params.yaml train section, the
   `mambastyle_small` encoder at 256 px against a 256-px random generator): losses finite,
   steps/s, and the autocast dtype used.
5. The invert stage's actor (`Inverter`, the class Ray Data runs, asked for a GPU) against
   `invert_batch` on the CPU for the same images: the actor's device, codes and metrics (TF32
   off for the comparison), then its images/s on the GPU with the default math settings
   (`mambastyle` encoder, 256-px generator with 512-d W, reconstructions and metrics on).

Exits non-zero if an agreement check fails. Usage: python benchmarks/gpu_check.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mambastyle.layers.selective_scan import available_backends, resolve_backend, selective_scan
from mambastyle.layers.ss2d import SS2D
from mambastyle.models.encoders import build_encoder


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def check_scan(device: str) -> dict:
    if "cuda" not in available_backends(device):
        return {"skipped": "mamba-ssm not importable (install the `cuda` extra)"}
    g = torch.Generator(device="cpu").manual_seed(0)
    bt, d, n, length, groups = 2, 256, 16, 2048, 4
    inputs = {
        "u": torch.randn(bt, d, length, generator=g),
        "delta": torch.randn(bt, d, length, generator=g) * 0.5 - 1,
        "A": -torch.rand(d, n, generator=g) * 8,
        "B": torch.randn(bt, groups, n, length, generator=g),
        "C": torch.randn(bt, groups, n, length, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(bt, d, length, generator=g),
        "delta_bias": torch.randn(d, generator=g) * 0.1,
    }
    weight = torch.randn(bt, d, length, generator=g)
    out = {}
    for backend in ("ref", "cuda"):
        xs = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
        y = selective_scan(**xs, delta_softplus=True, backend=backend)
        (y * weight.to(device)).sum().backward()
        out[backend] = (y.detach(), {k: v.grad for k, v in xs.items()})
    errs = {"y": rel_err(out["cuda"][0], out["ref"][0])}
    errs.update({f"d{k}": rel_err(out["cuda"][1][k], out["ref"][1][k]) for k in inputs})
    return {"relative_errors": errs, "ok": errs["y"] < 1e-3 and max(errs.values()) < 1e-2}


def check_ss2d(device: str) -> dict:
    torch.manual_seed(0)
    m = SS2D(64, d_state=16).to(device)
    x = torch.randn(2, 16, 16, 64, device=device)
    with torch.no_grad():
        m.scan_backend = "ref"
        ref = m(x)
        m.scan_backend = "auto"
        got = m(x)
    err = rel_err(got, ref)
    return {"backend": resolve_backend("auto", device), "relative_error": err, "ok": err < 1e-3}


@torch.no_grad()
def encoder_latency(device: str) -> dict:
    out = {}
    for name in ("mambastyle", "psp"):
        enc = build_encoder(name, 1024, seed=0).to(device).eval()
        out[name] = {}
        for batch in (1, 8):
            x = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
            for _ in range(3):
                enc(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                enc(x)
            torch.cuda.synchronize()
            out[name][f"ms_per_image_b{batch}"] = (time.perf_counter() - t0) / (10 * batch) * 1e3
        del enc
        torch.cuda.empty_cache()
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    device = "cuda"
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "scan_cuda_vs_ref": check_scan(device),
        "ss2d_vs_ref": check_ss2d(device),
        "encoder_latency": encoder_latency(device),
        "train_steps_amp": train_steps(device),
        "invert_actor": invert_actor(device),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [
        k
        for k in ("scan_cuda_vs_ref", "ss2d_vs_ref", "train_steps_amp", "invert_actor")
        if report[k].get("ok") is False
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
