"""Encoder parameters and CPU latency per 256x256 image: MambaStyle vs the pSp baseline.

Both built for a 1024-px generator (18 styles), random weights, eval mode, same threads,
measured in the same run at batch 1 and 8, interleaved. Prints per-image latency, the ratio
psp / mambastyle (> 1 means MambaStyle is faster) and the parameter ratio. The small and
tiny variants are listed for reference.

Usage: .venv/bin/python benchmarks/encoders.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mambastyle.layers.selective_scan import resolve_backend
from mambastyle.models.encoders import build_encoder


@torch.no_grad()
def time_once(enc, x) -> float:
    t0 = time.perf_counter()
    enc(x)
    return (time.perf_counter() - t0) / x.shape[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, "
        f"scan backend {resolve_backend('auto', 'cpu')}"
    )
    names = ["mambastyle", "psp", "mambastyle_small", "mambastyle_tiny"]
    encoders = {name: build_encoder(name, 1024, seed=0).eval() for name in names}
    results: dict[str, dict] = {
        n: {"parameters": sum(p.numel() for p in e.parameters())} for n, e in encoders.items()
    }
    ratios: dict[int, list[float]] = {}
    for batch in (1, 8):
        x = torch.rand(batch, 3, 256, 256) * 2 - 1
        times: dict[str, list[float]] = {n: [] for n in names}
        for enc in encoders.values():  # warm-up (and kernel compilation)
            time_once(enc, x)
        # Interleaved, so that a slow spell of the machine hits every encoder alike;
        # the speed-up is the median of per-round ratios.
        for _ in range(args.repeats):
            for name, enc in encoders.items():
                times[name].append(time_once(enc, x))
        ratios[batch] = [p / m for p, m in zip(times["psp"], times["mambastyle"], strict=True)]
        for name in names:
            results[name][f"ms_per_image_b{batch}"] = statistics.median(times[name]) * 1e3
    for name, r in results.items():
        print(
            f"{name:18} {r['parameters'] / 1e6:8.2f}M params   "
            f"b1 {r['ms_per_image_b1']:8.1f} ms/img   b8 {r['ms_per_image_b8']:8.1f} ms/img"
        )
    m, p = results["mambastyle"], results["psp"]
    summary = {
        "speedup_b1": statistics.median(ratios[1]),
        "speedup_b8": statistics.median(ratios[8]),
        "param_ratio": m["parameters"] / p["parameters"],
    }
    print(
        f"\nmambastyle vs psp: {summary['speedup_b1']:.2f}x faster at batch 1, "
        f"{summary['speedup_b8']:.2f}x at batch 8; {100 * summary['param_ratio']:.1f}% of the parameters "
        "(target: >= 2x and <= 25%)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"encoders": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
