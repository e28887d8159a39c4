"""The `triton` backend's SS2D kernels compiled for a GPU architecture on this machine (no GPU
needed), and the instructions their loops issue per state update.

The SS2D scans are bound by instruction issue and the SFU's exp2 rate once enough warps
hide the memory latency; the compiled loop shows both. Each kernel is compiled exactly as
the backend would launch it for the encoder's first level (d 1024, N 16, a 64x64 map, bf16
inputs as under autocast): the wrappers run on CPU tensors with the launch intercepted, so
arguments, strides, flags and Triton's specialisation of them (integers equal to 1 become
constants, multiples of 16 and 16-byte-aligned pointers get divisibility hints) are the
launch's. Triton's own ``ptxas`` and ``cuobjdump``
make the SASS.

Per kernel (SS2D's stepping scan for inference and for training, the inference's
merge/LayerNorm/gate pass, the VSS block's residual LayerNorm, SS2D's two backward kernels,
and the plain scan's chunked training forward and backward at the same size): registers and
local-memory loads/stores (spilled registers); for the scans the innermost loop's
instructions per iteration and warp, its exp2 (MUFU) and warp-shuffle counts, barriers, and
warp instructions per 32 state updates (one per lane) on the path every iteration takes
(the training forward's store of chunk states, once in BLOCK_T steps, is a block a branch
skips otherwise); then the ratio of the chunked forward's to the stepping kernel's. That
every kernel compiles for the GPU is itself a check the interpreter-run tests cannot make.
Counts are a proxy for time, not a timing: `benchmarks/gpu_check.py` measures on a GPU.

Usage: .venv/bin/python benchmarks/triton_sass.py [--arch 90] [--batch 2] [--dump DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

D_INNER, N_STATE, RANK, SIDE = 1024, 16, 32, 64
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _captured_launches(run) -> list[tuple]:
    """(kernel, tensors, sizes, strides, flags) of every launch ``run()`` makes."""
    from mambastyle.layers.selective_scan import _triton_kernels

    kernels = _triton_kernels()
    seen = []
    original = kernels._launch
    kernels._launch = lambda kernel, grid, tensors, sizes, strides, **flags: seen.append(
        (kernel, grid, tensors, sizes, strides, flags)
    )
    try:
        run()
    except Exception as err:  # a wrapper reading outputs the intercepted launch never wrote
        if not seen:
            raise RuntimeError(f"no launch captured: {err}") from err
    finally:
        kernels._launch = original
    return seen


def _compile(kernel, tensors, sizes, strides, flags, arch: int):
    """Compiles ``kernel`` for sm_``arch`` with the specialisation a launch of these arguments gets."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*tensors, *sizes, *strides, **flags)
    options, signature, constexprs, attrs = kernel._pack_args(backend, flags, bound, specialization, options)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    path = Path(nvidia.__file__).parent / "bin" / name
    if not path.exists():
        sys.exit(f"{path} is missing: this Triton wheel ships no {name}")
    return str(path)


def _sass_summary(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    dump = _tool("cuobjdump")
    try:
        sass = subprocess.run([dump, "-sass", f.name], capture_output=True, text=True, check=True)
        usage = subprocess.run([dump, "-res-usage", f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    code = [(int(a, 16), op, rest) for a, op, rest in INSTRUCTION.findall(sass.stdout)]
    branches = []  # (from, to) of every branch with a literal target
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target:
            branches.append((addr, int(target.group(1), 16)))
    # The innermost loops: backward branches' spans holding no other loop (a token passes each
    # once: e.g. the backward's recomputation of a chunk's states, then its walk back).
    loops = [(to, at) for at, to in branches if to < at]
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    inside = [(addr, op) for addr, op, _ in code if any(a <= addr <= b for a, b in inner)]
    # Blocks a forward branch inside a loop can skip (e.g. a store once in BLOCK_T steps).
    skipped = [(at, to) for at, to in branches if any(a <= at < to <= b for a, b in inner)]
    conditional = sum(1 for addr, _ in inside if any(at < addr < to for at, to in skipped))
    regs = re.search(r"REG:(\d+)", usage.stdout)
    # Local-memory loads and stores: registers spilled (thread-private arrays would be too)
    local = sum(1 for _, op, _ in code if op.split(".")[0] in ("LDL", "STL"))
    return {"sass": sass.stdout, "registers": int(regs.group(1)) if regs else None, "local": local,
            "loop": collections.Counter(op.split(".")[0] for _, op in inside), "loop_length": len(inside),
            "loops": len(inner), "conditional": conditional}  # fmt: skip


def _inputs(batch: int) -> dict:
    """The encoder's first-level SS2D scan inputs, as SS2D makes them under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    length = SIDE * SIDE
    bf16 = {"dtype": torch.bfloat16}
    return {
        "x": torch.randn(batch, length, D_INNER, generator=g).to(**bf16),
        "proj": torch.randn(batch, length, 4, RANK + 2 * N_STATE, generator=g).to(**bf16),
        "dt_weight": torch.randn(4, D_INNER, RANK, generator=g) / RANK**0.5,
        "A": -torch.rand(4, D_INNER, N_STATE, generator=g) * 8,
        "dt_bias": torch.randn(4, D_INNER, generator=g) * 0.1,
        "gate": tuple(torch.randn(D_INNER, generator=g) for _ in range(3)),  # D sum, norm weight, bias
        "z": torch.randn(batch, SIDE, SIDE, 2 * D_INNER, generator=g).to(**bf16)[..., D_INNER:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the captured launches (strides only)")
    parser.add_argument("--dump", type=Path, help="write each kernel's SASS here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be defined for compiling
    from mambastyle.layers.selective_scan import _triton_kernels
    from mambastyle.layers.ss2d import _step_sizes

    kernels = _triton_kernels()
    inp = _inputs(args.batch)
    n = N_STATE
    dts = _step_sizes(inp["dt_weight"].bfloat16(), inp["proj"], token_major=True)
    bc = inp["proj"][..., RANK:].permute(0, 2, 3, 1)
    B, C = bc[:, :, :n], bc[:, :, n:]
    launches = {}
    gated = _captured_launches(
        lambda: kernels.ss2d_infer_gated(
            inp["x"], dts, inp["dt_bias"], inp["A"], B, C, SIDE, SIDE, *inp["gate"], 1e-5, inp["z"]
        )
    )
    for kernel, _, tensors, sizes, strides, flags in gated:
        if "BLOCK_D" in flags:  # the stepping scan: tokens of every state of the block
            per_iteration = flags["BLOCK_D"] * flags["BLOCK_N"] * kernels.STEPS_PER_ITERATION
            launches["stepping (inference)"] = (kernel, tensors, sizes, strides, flags, per_iteration)
        else:  # the directions' sum, LayerNorm and gate: no state updates
            launches["merge, LayerNorm and gate (inference)"] = (kernel, tensors, sizes, strides, flags, 0)
    # The VSS block's output norm, residual formed inside, on its (B, H, W, C) map (C = d / 2)
    side_map = inp["x"][..., : D_INNER // 2].reshape(args.batch, SIDE, SIDE, D_INNER // 2)
    norm_params = tuple(t[: D_INNER // 2] for t in inp["gate"])
    ((kernel, _, tensors, sizes, strides, flags),) = _captured_launches(
        lambda: kernels.scaled_add_norm(
            side_map, *norm_params[1:], 1e-5, torch.float32, scale=norm_params[0], residual=side_map
        )
    )
    launches["residual LayerNorm (VSS block, inference)"] = (kernel, tensors, sizes, strides, flags, 0)
    dts_major = _step_sizes(inp["dt_weight"].bfloat16(), inp["proj"])  # (4, d, B, L): the plain scan's

    def ss2d_training():  # step sizes token-major, as SS2D makes them
        x = inp["x"].requires_grad_()
        kernels.SS2DScan.apply(x, dts, inp["dt_bias"], inp["A"], B, C, SIDE, SIDE)

    ((kernel, _, tensors, sizes, strides, flags),) = _captured_launches(ss2d_training)
    per_iteration = flags["BLOCK_D"] * flags["BLOCK_N"] * kernels.STEPS_PER_ITERATION
    launches["stepping with chunk states (SS2D training forward)"] = (
        kernel, tensors, sizes, strides, flags, per_iteration
    )  # fmt: skip

    def ss2d_backward():
        x = inp["x"].clone().requires_grad_()
        kernels.SS2DScan.apply(x, dts, inp["dt_bias"], inp["A"], B, C, SIDE, SIDE).sum().backward()

    default = kernels.SS2D_BACKWARD
    for choice in ("stepping", "chunked"):
        kernels.SS2D_BACKWARD = choice
        try:
            kernel, _, tensors, sizes, strides, flags = _captured_launches(ss2d_backward)[-1]
        finally:
            kernels.SS2D_BACKWARD = default
        # a token passes each of the stepping kernel's two loops once; the chunked kernel's
        # four directions' chunk loops (unrolled) take BLOCK_T tokens each
        per_pass = flags["BLOCK_D"] * flags["BLOCK_N"] * (1 if choice == "stepping" else 4 * flags["BLOCK_T"])
        launches[f"{choice} backward (SS2D training)"] = (kernel, tensors, sizes, strides, flags, per_pass)

    def plain_training():  # the four directions' channels as one scan of (B, 4 d, L), 4 groups
        length = SIDE * SIDE
        u = inp["x"].transpose(1, 2).repeat(1, 4, 1)
        bc = inp["proj"][..., RANK:].permute(0, 2, 3, 1)  # (B, 4, 2N, L)
        y, _ = kernels.SelectiveScan.apply(
            u.requires_grad_(), dts_major.permute(2, 0, 1, 3).reshape(args.batch, 4 * D_INNER, length),
            inp["A"].reshape(4 * D_INNER, n), bc[:, :, :n], bc[:, :, n:], None, None,
            inp["dt_bias"].reshape(-1), True, True,
        )  # fmt: skip
        y.sum().backward()

    for (kernel, _, tensors, sizes, strides, flags), pass_ in zip(
        _captured_launches(plain_training), ("forward", "backward"), strict=True
    ):
        updates = flags["BLOCK_D"] * flags["BLOCK_N"] * flags["BLOCK_T"]
        label = f"chunked {pass_} (plain scan, training)"
        launches[label] = (kernel, tensors, sizes, strides, flags, updates)

    print(
        f"triton SS2D kernels for sm_{args.arch}: d {D_INNER}, N {N_STATE}, {SIDE}x{SIDE} tokens, bf16 inputs"
    )
    per_update, report = {}, {}
    for label, (kernel, tensors, sizes, strides, flags, updates) in launches.items():
        compiled = _compile(kernel, tensors, sizes, strides, flags, args.arch)
        summary = _sass_summary(compiled.asm["cubin"])
        warps = flags.get("num_warps", 4)
        loop = summary["loop"]
        report[label] = {"registers": summary["registers"], "warps": warps, "local": summary["local"]}
        blocks = ", ".join(
            f"{k}={flags[k]}" for k in ("BLOCK", "BLOCK_D", "BLOCK_N", "BLOCK_T") if k in flags
        )
        print(f"{label}: {blocks}, {warps} warps, {summary['registers']} registers, "
              f"{summary['local']} local-memory loads/stores (spills)")  # fmt: skip
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{kernel.__name__}.sass").write_text(summary["sass"])
        if not updates:
            continue
        main = summary["loop_length"] - summary["conditional"]  # what every iteration issues
        per_update[label] = main * warps * 32 / updates
        tokens = updates // (flags["BLOCK_D"] * flags["BLOCK_N"])  # per pass through the loops
        report[label].update(
            loop=dict(loop), loop_length=summary["loop_length"], conditional=summary["conditional"],
            per_32_updates=per_update[label], tokens_per_iteration=tokens, loops=summary["loops"],
        )  # fmt: skip
        print(f"  innermost loops ({summary['loops']}, {tokens} tokens): {summary['loop_length']} "
              "instructions per pass and warp, "
              f"{summary['conditional']} of them in blocks a branch skips "
              f"({loop['MUFU']} MUFU, {loop['SHFL']} SHFL, {loop['BAR']} BAR, "
              f"{loop['LDL'] + loop['STL']} LDL/STL in all); "
              f"{per_update[label]:.1f} warp instructions per 32 state updates, every iteration")  # fmt: skip
        print("  most frequent:", ", ".join(f"{op} {c}" for op, c in loop.most_common(8)))
    stepping, chunked = "stepping (inference)", "chunked forward (plain scan, training)"
    ratio = per_update[chunked] / per_update[stepping]
    print(f"{chunked} vs {stepping}: {ratio:.2f}x the instructions per state update")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "kernels": report, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
