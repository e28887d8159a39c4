"""Encoder parameters and steady-state CPU latency per 256x256 image: MambaStyle vs pSp.

Each (encoder, precision) runs in a process of its own, so that no model's caches, allocator
state or thread pools touch another's; the processes take turns (``--rounds`` times each,
alternating, so that a slow spell of the machine hits both encoders) and every one warms up
before it is timed. Per batch size (1 and 8) a process times ``--calls`` calls; the figure is
the median ms/image over all of an encoder's calls, printed with the spread (10th-90th
percentile). Precisions: fp32, and bf16 autocast where the CPU has bf16 instructions (AMX or
AVX512-BF16; the codes' largest deviation from fp32 on the same images is printed). Both
encoders are built for a 1024-px generator (18 styles) with random weights, in eval mode,
placed as the stages load them (``on_device``: channels-last convolutions on CPU), with the
stages' allocator settings and the same threads. Prints the psp / mambastyle ratio
per batch and precision (> 1: MambaStyle is faster); targets >= 1.75 at batch 1, >= 1.5 at 8.
The small and tiny variants' parameters are listed for reference.

Usage: .venv/bin/python benchmarks/encoders.py [--rounds 2] [--calls 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCHES = (1, 8)
TARGETS = {1: 1.75, 8: 1.5}


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def measure(name: str, precision: str, calls: int) -> dict:
    """In a worker process: ms/image of every timed call per batch size, and for bf16 the
    codes' deviation from fp32."""
    import torch

    from mambastyle.models.encoders import build_encoder, on_device

    enc = on_device(build_encoder(name, 1024, seed=0), "cpu").eval()  # as the stages load them
    bf16 = precision == "bf16"
    out: dict = {"calls_ms_per_image": {}}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for _ in range(2 if batch > 1 else 4):  # warm-up: kernels compiled, buffers allocated
                    enc(x)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    enc(x)
                    times.append((time.perf_counter() - t0) / batch * 1e3)
            out["calls_ms_per_image"][str(batch)] = times
        if bf16:
            x = torch.rand(4, 3, 256, 256, generator=gen) * 2 - 1
            want = enc(x).float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = enc(x).float()
            out["bf16_max_deviation"] = ((got - want).abs().max() / want.abs().max()).item()
    return out


def run_worker(name: str, precision: str, calls: int) -> dict:
    from mambastyle.runtime import worker_env

    cmd = [sys.executable, __file__, "--worker", name, precision, "--calls", str(calls)]
    # Each measuring process gets the allocator settings the stages' model workers run with
    # (without them glibc gives large freed blocks back and faults them in on every pass).
    env = {**os.environ, **worker_env()}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return statistics.median(values), qs[0], qs[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="processes per encoder and precision")
    parser.add_argument("--calls", type=int, default=6, help="timed calls per batch size and process")
    parser.add_argument("--json")
    parser.add_argument("--worker", nargs=2, metavar=("ENCODER", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args.calls)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from allocator import restart_with_allocator_env

    restart_with_allocator_env()  # the workers inherit it
    import torch

    from mambastyle.layers.selective_scan import resolve_backend
    from mambastyle.models.encoders import build_encoder

    precisions = ["fp32", *(["bf16"] if cpu_has_bf16() else [])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, scan backend "
          f"{resolve_backend('auto', 'cpu')}, precisions {', '.join(precisions)}")  # fmt: skip
    params = {n: sum(p.numel() for p in build_encoder(n, 1024, seed=0).parameters())
              for n in ("mambastyle", "psp", "mambastyle_small", "mambastyle_tiny")}  # fmt: skip
    calls: dict = {(n, p): {b: [] for b in BATCHES} for n in ("mambastyle", "psp") for p in precisions}
    deviation = {}
    for _ in range(args.rounds):
        for precision in precisions:
            for name in ("psp", "mambastyle"):
                got = run_worker(name, precision, args.calls)
                for b in BATCHES:
                    calls[name, precision][b] += got["calls_ms_per_image"][str(b)]
                deviation[name, precision] = max(deviation.get((name, precision), 0.0),
                                                 got.get("bf16_max_deviation", 0.0))  # fmt: skip
    results: dict = {"parameters": params, "ms_per_image": {}, "ratio_psp_over_mambastyle": {}}
    for (name, precision), per_batch in calls.items():
        for b, values in per_batch.items():
            med, lo, hi = spread(values)
            results["ms_per_image"][f"{name}_{precision}_b{b}"] = med
            print(f"{name:11} {precision} batch {b}: {med:7.1f} ms/image (p10-p90 {lo:.1f}-{hi:.1f}, "
                  f"{len(values)} calls)" + (f", codes within {100 * deviation[name, precision]:.2f}% of fp32"
                                             if precision == "bf16" else ""))  # fmt: skip
    for name, n in params.items():
        print(f"{name:18} {n / 1e6:8.2f}M parameters")
    for precision in precisions:
        for b in BATCHES:
            ms = results["ms_per_image"]
            ratio = ms[f"psp_{precision}_b{b}"] / ms[f"mambastyle_{precision}_b{b}"]
            results["ratio_psp_over_mambastyle"][f"{precision}_b{b}"] = ratio
            print(f"mambastyle vs psp, {precision}, batch {b}: {ratio:.2f}x faster (target >= {TARGETS[b]})")
    print(f"parameters: {100 * params['mambastyle'] / params['psp']:.1f}% of psp's")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
