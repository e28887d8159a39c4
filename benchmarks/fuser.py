"""The fuser's cost and gain: fuser-mode vs W+-only editing per image, and reconstructions with and
without the fuser on the demo's test split, both measured in the same run.

1. Cost (CPU, same batch, threads and edits): W+-only editing renders ``G(w + d)`` from stored
   codes (``mambastyle.edit.core.render``); fuser mode re-encodes each face and renders
   ``G(w + d, feature_offset = fuser(C, d))`` (``fused_edits``). Printed: ms per edited image
   each way and the ratio. Sizes: the demo's (64 px, ``mambastyle_tiny`` + ``fuser_tiny``), and
   with ``--resolution 256`` a 256-px generator with ``mambastyle_small`` + ``fuser_small``.
2. Gain: the demo's fuser checkpoint (``data/fuser/fuser.json``, from ``make demo``) on the test
   faces of the demo's shards: MSE and SSIM of the W+ reconstruction and of the fused one (LPIPS
   too when AlexNet's weights are in the torch hub cache). Skipped, saying so, without a demo run.

Usage:
    .venv/bin/python benchmarks/fuser.py [--resolution 64] [--images 32] [--strengths 4]
                                         [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {  # generator resolution -> (encoder, fuser, style_dim, encoder input)
    64: ("mambastyle_tiny", "fuser_tiny", 64, 64),
    256: ("mambastyle_small", "fuser_small", 256, 256),
}


def _timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up (kernels compiled, allocator primed)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cost(args) -> None:
    from mambastyle.config import load_params
    from mambastyle.directions import Direction
    from mambastyle.edit.core import Edit, apply_edits, fused_edits, render
    from mambastyle.generate import resolve_generator
    from mambastyle.models.encoders import build_encoder
    from mambastyle.models.fuser import FuserModel, build_fuser

    enc_name, fuser_name, style_dim, input_size = SIZES[args.resolution]
    gp = load_params().generator
    arch = dataclasses.replace(gp.architecture, resolution=args.resolution, style_dim=style_dim,
                               channel_max=style_dim)  # fmt: skip
    g = resolve_generator(None, arch, 0, 1000)
    enc = build_encoder(enc_name, args.resolution, seed=0, input_size=input_size, style_dim=style_dim).eval()
    enc.set_latent_avg(g.latent_avg)
    fuser = build_fuser(fuser_name, enc.config, g.config, seed=0).eval()
    torch.nn.init.normal_(fuser.out.weight, std=0.01)  # a trained fuser's output is not zero
    model = FuserModel(enc, fuser).eval()
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (args.images, input_size, input_size, 3), dtype=np.uint8)
    vector = rng.standard_normal((g.n_styles, style_dim)).astype(np.float32)
    edit = Edit("bench", Direction(vector / np.linalg.norm(vector[0]), "bench", "-"),
                tuple(float(s) for s in np.linspace(-2, 2, args.strengths)))  # fmt: skip
    with torch.no_grad():
        w = enc(torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy()
    n = args.images * args.strengths
    plain = _timed(lambda: render(g, apply_edits(w, [edit])[0], args.batch_size))
    fused = _timed(lambda: fused_edits(g, model, faces, [edit], args.batch_size))
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("encoder", enc), ("fuser", fuser))}
    print(f"cost: {args.resolution}-px generator, {enc_name} + {fuser_name} ({params}),")
    print(f"  {args.images} faces x {args.strengths} strengths, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"  W+ only:    {1000 * plain / n:8.2f} ms/image")
    print(f"  fuser mode: {1000 * fused / n:8.2f} ms/image (re-encoding {args.images} faces included)")
    print(f"  ratio fuser/W+: {fused / plain:.2f}")


def gain(args) -> None:
    from mambastyle.checkpoints import checkpoint_source, load_fuser
    from mambastyle.config import load_params
    from mambastyle.data.shards import decode_png, manifest_shards, read_shard
    from mambastyle.evaluate import reconstruction_metrics
    from mambastyle.generate import resolve_generator
    from mambastyle.pretrained import alexnet_hub_path, build_lpips, weights_available
    from mambastyle.storage import resolve

    record = Path("data/fuser/fuser.json")
    if not record.is_file() or not json.loads(record.read_text()).get("enabled"):
        print("gain: skipped: no demo fuser (run `make demo` first)")
        return
    p = load_params()
    options = p.storage.options()
    encoder, fuser, _ = load_fuser(checkpoint_source(json.loads(record.read_text())["uri"], options))
    gp = p.generator
    g = resolve_generator(
        gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples, options=options
    )
    lpips = build_lpips(alexnet_hub_path()) if weights_available(alexnet_hub_path()) else None
    shards = manifest_shards(resolve(p.storage.root, options), "test")
    images = [decode_png(png, key) for s in shards for key, png in read_shard(s.uri, options)]
    values, _ = reconstruction_metrics(encoder, g, images, 16, lpips, None, fuser)
    print(f"gain: demo test split, {len(images)} faces ({'with' if lpips else 'no'} LPIPS weights)")
    for metric in ("mse", "ssim", "lpips"):
        if metric in values:
            a, b = np.mean(values[metric]), np.mean(values[f"{metric}_fuser"])
            print(f"  {metric:5s}  W+ {a:.4f}  fuser {b:.4f}  ({100 * (b - a) / a:+.1f}%)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, choices=sorted(SIZES), default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--strengths", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cost(args)
    gain(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
