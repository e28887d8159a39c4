"""Generator forward time per image on this machine, against a baseline measured in the same run.

Configurations: the small demo generator (params.yaml) and the standard 256-px StyleGAN2
(channel multiplier 2, 8 mapping layers, 14 styles). For each, two implementations:

- ours: modulated convolution by batch size (one plain convolution with the modulated
  weight for a single image; for batches, styles scale the activations, one shared batched
  convolution, demodulation scales the output) and a polyphase upfirdn2d (strided
  transposed convolution, no zero-inserted tensor);
- baseline: the formulation the peer code runs without its CUDA ops: per-sample weights
  with a grouped convolution, and upfirdn2d by explicit zero insertion + padded convolution.

Prints ms per image and the ratio baseline / ours (> 1 means ours is faster). Run with
`make bench` or `.venv/bin/python benchmarks/generator_forward.py [--json out.json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mambastyle.models.stylegan2 as sg
from mambastyle.config import load_params
from mambastyle.layers.upfirdn2d import _normalise_pad, _pair
from mambastyle.models.stylegan2 import GeneratorConfig, ModulatedConv2d, build_generator

REPO = Path(__file__).resolve().parents[1]


def upfirdn2d_zero_insert(x, kernel, up=1, down=1, pad=0):
    """Baseline upfirdn2d: materialise the zero-inserted signal, pad, convolve, decimate."""
    upx, upy = _pair(up, "up")
    downx, downy = _pair(down, "down")
    px0, px1, py0, py1 = _normalise_pad(pad)
    b, c, h, w = x.shape
    out = x.reshape(b * c, h, 1, w, 1)
    out = F.pad(out, [0, upx - 1, 0, 0, 0, upy - 1]).reshape(b * c, 1, h * upy, w * upx)
    out = F.pad(out, [px0, px1, py0, py1])
    out = F.conv2d(out, kernel.flip([0, 1])[None, None].to(x))
    out = out[:, :, ::downy, ::downx]
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


@contextlib.contextmanager
def baseline_ops():
    """Swaps in the baseline implementations for the duration of the block."""
    fwd, up = ModulatedConv2d.forward, sg.upfirdn2d
    ModulatedConv2d.forward, sg.upfirdn2d = ModulatedConv2d.forward_grouped, upfirdn2d_zero_insert
    try:
        yield
    finally:
        ModulatedConv2d.forward, sg.upfirdn2d = fwd, up


@torch.no_grad()
def time_forward(g, batch: int, repeats: int) -> float:
    """Median seconds per image of synthesis (mapping included) at ``batch``."""
    z = torch.randn(batch, g.style_dim)
    g(z, noise_mode="const")  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        g(z, noise_mode="const")
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    small = load_params(REPO / "params.yaml").generator.architecture
    configs = [
        ("small (params.yaml)", small, [1, 8]),
        ("256 px, cm 2", GeneratorConfig(resolution=256, channel_multiplier=2), [1, 4]),
    ]
    alloc = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, allocator env {alloc}")
    print(f"{'config':22} {'batch':>5} {'ours ms/img':>12} {'baseline ms/img':>16} {'ratio':>7}")
    rows = []
    for name, cfg, batches in configs:
        g = build_generator(cfg, seed=0).eval()
        g.compute_latent_avg(1000)
        # both implementations must compute the same images
        w_plus = torch.randn(2, g.n_styles, g.style_dim)
        with torch.no_grad():
            ours_img = g.synthesis(w_plus)
            with baseline_ops():
                base_img = g.synthesis(w_plus)
        diff = (ours_img - base_img).abs().max().item()
        for batch in batches:
            ours = time_forward(g, batch, args.repeats)
            with baseline_ops():
                base = time_forward(g, batch, args.repeats)
            row = {
                "config": name,
                "resolution": cfg.resolution,
                "batch": batch,
                "ours_ms_per_image": ours * 1e3,
                "baseline_ms_per_image": base * 1e3,
                "ratio": base / ours,
                "max_abs_diff": diff,
            }
            rows.append(row)
            print(f"{name:22} {batch:5d} {ours * 1e3:12.1f} {base * 1e3:16.1f} {base / ours:7.2f}x")
    print(f"max |ours - baseline| over outputs: {max(r['max_abs_diff'] for r in rows):.2e}")

    # The FIR upsampling op alone (ToRGB skip path; any 2x FIR upsample), at a size where it
    # matters: polyphase (ours) vs zero insertion.
    x = torch.randn(4, 256, 64, 64)
    k = sg.make_kernel([1, 3, 3, 1]) * 4
    ops = {"ours": sg.upfirdn2d, "baseline": upfirdn2d_zero_insert}
    t = {}
    for label, op in ops.items():
        op(x, k, up=2, pad=(2, 1))
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            op(x, k, up=2, pad=(2, 1))
            samples.append(time.perf_counter() - t0)
        t[label] = statistics.median(samples)
    diff = (ops["ours"](x, k, up=2, pad=(2, 1)) - upfirdn2d_zero_insert(x, k, up=2, pad=(2, 1))).abs().max()
    print(
        f"upfirdn2d up=2 (4, 256, 64, 64): ours {t['ours'] * 1e3:.1f} ms, baseline "
        f"{t['baseline'] * 1e3:.1f} ms, ratio {t['baseline'] / t['ours']:.2f}x (max diff {diff:.1e})"
    )
    rows.append(
        {
            "op": "upfirdn2d_up2",
            "ours_ms": t["ours"] * 1e3,
            "baseline_ms": t["baseline"] * 1e3,
            "ratio": t["baseline"] / t["ours"],
        }
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
