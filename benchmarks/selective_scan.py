"""Selective scan on CPU: each backend against a naive reference, measured in the same run.

The naive reference is the formulation of mamba-ssm's ``selective_scan_ref``: it
materialises deltaA = exp(delta * A) and deltaB_u = delta * B * u as (B, D, L, N) tensors
and indexes one time step out of them per iteration (so autograd's backward is
O(L x tensor size)). Shapes: (B=2, D=192, N=16, L=4096) and (B=1, D=4096, N=16, L=4096)
(the 64x64 VSS block of the published encoder: 4 directions x 1024 channels).

Also printed: the memory-traffic floor of the forward pass (bytes of u, delta, B, C read
and y written, at the copy bandwidth measured now) and each forward's multiple of it; and
an exp floor: the time torch's vectorised exp takes for the D * L * N decays the forward
must compute, on cache-resident data (the scan is bound by these, not by memory traffic).

Usage: .venv/bin/python benchmarks/selective_scan.py [--skip-naive-backward] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mambastyle.layers.selective_scan import available_backends, selective_scan


def naive_scan(u, delta, A, B, C):
    """mamba-ssm selective_scan_ref's formulation (B, C: (Bt, N, L); no D/z)."""
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (Bt, D, L, N)
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    return torch.stack(ys, dim=2)


def inputs(bt, d, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(bt, d, length, generator=g),
        "delta": torch.rand(bt, d, length, generator=g) * 0.099 + 0.001,  # dt in [1e-3, 0.1]
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),  # S4D-real
        "B": torch.randn(bt, n, length, generator=g),
        "C": torch.randn(bt, n, length, generator=g),
    }


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(run, x):
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    run(xs).sum().backward()


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write)."""
    src = torch.randn(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = timed(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * 4 / t


def exp_rate() -> float:
    """Exponentials per second of torch.exp on a cache-resident float32 buffer (all threads)."""
    src = torch.rand(1 << 16) * -10
    dst = torch.empty_like(src)
    reps = 512
    t = timed(lambda: [torch.exp(src, out=dst) for _ in range(reps)], 3)
    return reps * src.numel() / t


def fused_ss2d(backends: list[str], repeats: int) -> list[dict]:
    """Rows for the fused four-direction SS2D kernel (see the comment inside)."""
    rows = []
    # The fused four-direction SS2D kernel on the same work as the D=4096 case: the 64x64 VSS
    # block of the published encoder (4 directions x 1024 channels), with its cross-scan and
    # cross-merge included (the generic backends pay for explicit permuted copies).
    from mambastyle.layers.ss2d import ss2d_scan

    g = torch.Generator().manual_seed(1)
    h = w = 64
    d, n = 1024, 16
    x = {
        "x": torch.randn(1, h * w, d, generator=g),
        "dts": torch.randn(4, d, 1, h * w, generator=g) - 3.0,
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(4, d, 1),
        "B": torch.randn(1, 4, n, h * w, generator=g),
        "C": torch.randn(1, 4, n, h * w, generator=g),
        "D": torch.ones(4, d),
        "dt_bias": torch.zeros(4, d),
    }
    for b in backends:
        run = lambda xs, b=b: ss2d_scan(**xs, h=h, w=w, backend=b)  # noqa: E731
        with torch.no_grad():
            run(x)
            f = timed(lambda run=run: run(x), repeats)
        fb = timed(lambda run=run: fwd_bwd(run, x), repeats) if b != "ref" else None
        rows.append({"shape": "ss2d 4x1024ch 64x64", "backend": b, "fwd_ms": f * 1e3,
                     "fwd_bwd_ms": fb * 1e3 if fb else None})  # fmt: skip
        fb_text = f"   fwd+bwd {fb * 1e3:8.1f} ms" if fb else ""
        print(f"  ss2d_scan[{b}] (4 dirs x 1024 ch, 64x64): fwd {f * 1e3:8.1f} ms{fb_text}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-naive-backward", action="store_true", help="skip the naive fwd+bwd at D=192 (about 2-3 min)"
    )
    parser.add_argument("--json")
    args = parser.parse_args()

    bw = copy_bandwidth()
    exps = exp_rate()
    backends = [b for b in available_backends("cpu")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth {bw / 1e9:.1f} GB/s, "
        f"torch.exp {exps / 1e9:.2f} G/s"
    )
    print(f"backends here: {', '.join(backends)} (+ naive reference)")
    warm = inputs(1, 4, 16, 128)
    for b in backends:  # compile / warm up
        fwd_bwd(lambda xs, b=b: selective_scan(**xs, backend=b), warm)

    rows = []
    for bt, d, n, length in [(2, 192, 16, 4096), (1, 4096, 16, 4096)]:
        x = inputs(bt, d, n, length)
        floor = 4 * (3 * bt * d * length + 2 * bt * n * length) / bw  # u, delta, y + B, C
        exp_floor = bt * d * length * n / exps
        label = f"B={bt} D={d} N={n} L={length}"
        with torch.no_grad():
            naive_f = timed(lambda x=x: naive_scan(**x), 1)
        naive_fb = None
        if d <= 192 and not args.skip_naive_backward:
            naive_fb = timed(lambda x=x: fwd_bwd(lambda xs: naive_scan(**xs), x), 1)
        print(f"\n{label}: forward floor {floor * 1e3:.2f} ms (memory), {exp_floor * 1e3:.2f} ms (exp)")
        print(
            f"  naive    fwd {naive_f * 1e3:9.1f} ms"
            + (f"   fwd+bwd {naive_fb:8.2f} s" if naive_fb else "   fwd+bwd not run")
        )
        for b in backends:
            with torch.no_grad():
                f = timed(lambda x=x, b=b: selective_scan(**x, backend=b), args.repeats)
            fb = timed(lambda x=x, b=b: fwd_bwd(lambda xs: selective_scan(**xs, backend=b), x), args.repeats)
            row = {
                "shape": label,
                "backend": b,
                "fwd_ms": f * 1e3,
                "fwd_bwd_ms": fb * 1e3,
                "fwd_speedup_vs_naive": naive_f / f,
                "fwd_bwd_speedup_vs_naive": naive_fb / fb if naive_fb else None,
                "fwd_multiple_of_memory_floor": f / floor,
                "fwd_multiple_of_exp_floor": f / exp_floor,
            }
            rows.append(row)
            fb_ratio = f"{row['fwd_bwd_speedup_vs_naive']:7.0f}x" if naive_fb else "      -"
            print(
                f"  {b:8} fwd {f * 1e3:9.1f} ms ({naive_f / f:6.1f}x naive, {f / floor:5.1f}x floor, "
                f"{f / exp_floor:4.1f}x exp floor)"
                f"   fwd+bwd {fb * 1e3:8.1f} ms ({fb_ratio} naive)"
            )
    if "cpu" in backends:
        rows += fused_ss2d(backends, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
