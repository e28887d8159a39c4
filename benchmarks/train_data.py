"""Training throughput through the full data path vs the same steps on in-memory tensors.

Both arms run the same trainer (the params.yaml train section, every step a real-image
step so that data loading is exercised on each one) on the same images: once streamed from
WebDataset shards on disk (tar reading, PNG decoding, shuffling, batching in a background
thread), once from a tensor already in memory. Rounds alternate between the arms so that a
slow spell of the machine hits both alike; the ratio is the median over rounds.
Target: ratio >= 0.9 (data loading is not the bottleneck).

A third arm feeds the same steps from Ray Data (``read_webdataset`` + ``iter_torch_batches``
on a local Ray), the alternative to per-worker shard streaming that the train stage weighed.

Usage:
    .venv/bin/python benchmarks/train_data.py [--size 64] [--rounds 5] [--steps 10] [--images 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from mambastyle.config import load_params
from mambastyle.data.shards import manifest_shards
from mambastyle.generate import resolve_generator
from mambastyle.models.encoders import build_encoder
from mambastyle.storage import resolve
from mambastyle.train.data import Prefetcher, ShardStream, tensor_batches
from mambastyle.train.loop import Trainer
from mambastyle.train.losses import build_loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="stored image side (the demo's is 64)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shard-samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and arm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import write_shards  # the tests' shard writer: random images, real format

    p = load_params()
    train = dataclasses.replace(p.train, synthetic_ratio=0.0)
    g = resolve_generator(None, p.generator.architecture, p.generator.init_seed, 2000)
    encoder = build_encoder(
        train.encoder, g.resolution, seed=0, input_size=train.input_size, style_dim=g.style_dim
    )
    encoder.set_latent_avg(g.latent_avg)
    loss, _ = build_loss(train.loss, train.pretrained)
    trainer = Trainer(encoder, g, loss, train)

    with tempfile.TemporaryDirectory() as tmp:
        root = resolve(tmp)
        n_shards = -(-args.images // args.shard_samples)
        counts = [min(args.shard_samples, args.images - i * args.shard_samples) for i in range(n_shards)]
        write_shards(root, {"train": counts}, size=args.size)
        stream = ShardStream(manifest_shards(root, "train"), seed=0)
        memory = torch.stack(
            [img for _, (_, img) in zip(range(args.images), stream.samples(0), strict=False)]
        )
        bs = train.batch_size

        def timed(batches) -> float:
            for _ in range(2):  # warm-up: first decode, allocator, thread start
                trainer.train_step(next(batches))
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(next(batches))
            elapsed = time.perf_counter() - t0
            batches.close()  # generators and the prefetch thread: release before Ray shuts down
            return elapsed

        import os

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        urls = [s.uri for s in stream.shards]

        def ray_batches():
            ds = ray.data.read_webdataset(urls).select_columns(["png"]).random_shuffle(seed=0)
            for batch in ds.iter_torch_batches(batch_size=bs, drop_last=True):
                yield batch["png"].permute(0, 3, 1, 2)

        disk_t, mem_t, ray_t = [], [], []
        position = 0
        for _ in range(args.rounds):
            disk_t.append(timed(Prefetcher(lambda pos=position: stream.batches(bs, pos))))
            mem_t.append(timed(tensor_batches(memory, bs, start=position)))
            ray_t.append(timed(ray_batches()))
            position += (args.steps + 2) * bs
    ratio = statistics.median(m / d for m, d in zip(mem_t, disk_t, strict=True))
    ray_ratio = statistics.median(m / r for m, r in zip(mem_t, ray_t, strict=True))
    print(f"{train.encoder}, batch {bs}, input {train.input_size}px, stored {args.size}px PNG, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(f"  in-memory tensors:   {args.steps / statistics.median(mem_t):6.2f} steps/s")
    print(f"  shards (full path):  {args.steps / statistics.median(disk_t):6.2f} steps/s")
    print(f"  Ray Data shards:     {args.steps / statistics.median(ray_t):6.2f} steps/s")
    print(f"  ratio full/in-memory: {ratio:.3f}  (target >= 0.9)")
    print(f"  ratio Ray Data/in-memory: {ray_ratio:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
