"""Invert stage throughput and latent-table query speed, against baselines measured in the same run.

1. Images/s through the whole Ray Data pipeline (shards on disk -> read_webdataset -> actor
   pool -> Parquet parts -> committed manifest) vs the bare encoder forward, same batch size
   and total threads, timed before and after the pipeline and averaged, on the first
   --bare-images of the same images (a warm forward's rate does not depend on the count).
   The bare forward runs in one process with --threads threads; the pipeline gets that many
   CPUs and runs as the stage does there: one single-threaded actor per CPU (--actors N runs
   N actors of threads // N threads each instead).
   Codes only (no reconstructions), so both sides do the same model work, with the same
   allocator settings (the script restarts itself with mambastyle.runtime.ALLOCATOR_ENV where
   unset, as the stage's actors get them). The pipeline's time includes fixed costs (actor
   start-up, the commit) besides per-image ones (decoding, Parquet), so the ratio grows with
   --images; the default, 4096, is a small dataset's worth. Target ratio >= 0.85.
2. On a synthetic 100k-row latent table (18 x 512 W+ per row, as for a 1024-px generator):
   time to fetch the w_plus of a 1% selection by a metadata predicate vs a full scan of
   w_plus. Target >= 20x faster.

Usage:
    .venv/bin/python benchmarks/invert.py [--images 4096] [--bare-images 1024] [--size 256]
                                          [--encoder mambastyle_tiny]
                                          [--rows 100000] [--skip-pipeline] [--skip-table]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
META = {"encoder_sha256": "-", "generator_sha256": "-", "run_id": "bench"}


def pipeline_vs_bare(args) -> None:
    from helpers import write_shards  # the tests' shard writer: random images, real format

    from mambastyle.checkpoints import save_encoder
    from mambastyle.data.shards import manifest_shards
    from mambastyle.invert.pipeline import InvertJob, run_inversion
    from mambastyle.models.encoders import build_encoder, on_device
    from mambastyle.models.inversion import invert_batch
    from mambastyle.runtime import connect_ray
    from mambastyle.storage import StorageOptions, resolve
    from mambastyle.train.data import ShardStream

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = resolve(tmp)
        per = 256
        counts = [min(per, args.images - i) for i in range(0, args.images, per)]
        write_shards(root, {"train": counts}, size=args.size)
        enc = on_device(build_encoder(args.encoder, 1024, seed=0, input_size=args.size), "cpu").eval()
        buf = io.BytesIO()
        save_encoder(enc, buf)
        (Path(tmp) / "enc.pt").write_bytes(buf.getvalue())
        shards = manifest_shards(root, "train")
        n_bare = max(1, min(args.bare_images, args.images))  # the bare forward's rate needs no more
        images = torch.stack(
            [img for _, (_, img) in zip(range(n_bare), ShardStream(shards).samples(0), strict=False)]
        )

        torch.set_num_threads(args.threads)
        invert_batch(enc, images[: args.batch_size])  # warm-up

        def bare_run() -> float:
            t0 = time.perf_counter()
            for i in range(0, len(images), args.batch_size):
                invert_batch(enc, images[i : i + args.batch_size])
            return time.perf_counter() - t0

        before = bare_run()

        connect_ray(None, num_cpus=args.threads)  # as the invert stage starts its local Ray
        ray.data.DataContext.get_current().enable_progress_bars = False
        job = InvertJob(root=root.uri, encoder=str(Path(tmp) / "enc.pt"), out=str(Path(tmp) / "latents"),
                        options=StorageOptions(), generator=None, batch_size=args.batch_size,
                        num_actors=args.actors, cpus_per_actor=args.threads // args.actors, use_gpu=False,
                        row_group_size=1024, rows_per_file=100_000,
                        metadata=META)  # fmt: skip
        entries = json.loads((Path(tmp) / "shards" / "manifest.json").read_text())["shards"]
        t0 = time.perf_counter()
        manifest = run_inversion(job, entries)
        whole = time.perf_counter() - t0
        assert manifest["rows"] == args.images
        ray.shutdown()
        # the baseline again, after: this machine's speed drifts by ~10% over minutes
        after = bare_run()
        bare_rate = n_bare / ((before + after) / 2)
    print(
        f"1. {args.images} images {args.size}px, {args.encoder}, "
        f"batch {args.batch_size}, {args.threads} threads (pipeline: {args.actors} actors of "
        f"{args.threads // args.actors} threads)"
    )
    print(f"   bare encoder forward:  {bare_rate:7.1f} img/s  (on {n_bare} images, mean of before/after: "
          f"{n_bare / before:.1f}, {n_bare / after:.1f})")  # fmt: skip
    print(f"   whole pipeline:        {args.images / whole:7.1f} img/s  (incl. actor start, Parquet, commit)")
    print(f"   beyond the bare forward of {args.images} images: {whole - args.images / bare_rate:.1f} s "
          f"of {whole:.1f} s")  # fmt: skip
    print(f"   ratio pipeline/bare:   {args.images / whole / bare_rate:.3f}  (target >= 0.85)", flush=True)


def selection_vs_scan(args) -> None:
    import pyarrow.dataset as pads

    from mambastyle.latents import build_part, commit, open_table, schema, table_metadata, write_part
    from mambastyle.storage import resolve

    rng = np.random.default_rng(0)
    n_styles, dim = 18, 512
    s = schema(n_styles, dim, META)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = resolve(tmp)
        parts, chunk, written = [], 10_000, 0
        for index, start in enumerate(range(0, args.rows, chunk)):
            n = min(chunk, args.rows - start)
            rows = {
                "key": [f"k{start + i:07d}" for i in range(n)],
                "shard": [f"train-{index:06d}.tar"] * n,
                "w_plus": rng.standard_normal((n, n_styles, dim), dtype=np.float32),
                "yaw": rng.uniform(-45, 45, n).astype(np.float32),
                "mse": rng.random(n).astype(np.float32),
            }
            path = f"split=train/part-{index:05d}.parquet"
            write_part(build_part(rows, s), prefix.join(path), args.row_group_size)
            parts.append({"path": path, "split": "train", "rows": n})
            written += n
        commit(prefix, parts, table_metadata(s))
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
        t = open_table(prefix.uri)
        predicate = pads.field("yaw") > 44.1  # ~1% of rows

        def timed(fn, repeat=3):
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - t0)
            return best, out

        scan_t, full = timed(lambda: t.to_table(columns=["w_plus"]))
        sel_t, sel = timed(lambda: t.to_table(filter=predicate, columns=["w_plus"]))
    print(f"2. {written} rows ({size / 2**30:.2f} GiB, row groups of {args.row_group_size}), "
          f"1% selection by yaw: {sel.num_rows} rows")  # fmt: skip
    print(f"   full scan of w_plus:   {scan_t:7.3f} s ({full.num_rows} rows)")
    print(f"   selection:             {sel_t:7.3f} s")
    print(f"   ratio scan/selection:  {scan_t / sel_t:.1f}x  (target >= 20x)", flush=True)


def main() -> int:
    from allocator import restart_with_allocator_env

    restart_with_allocator_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        type=int,
        default=4096,
        help="16 shards of 256: enough for the fixed costs (~6-10 s) to amortise",
    )
    parser.add_argument("--bare-images", type=int, default=1024, help="images for the bare forward's rate")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--encoder", default="mambastyle_tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--actors",
        type=int,
        help="pipeline actors, threads // actors threads each (default: one per "
        "thread, as the stage runs on that many CPUs)",
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--row-group-size", type=int, default=256, help="rows (params.yaml invert.row_group_size)"
    )
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args()
    args.actors = args.actors or args.threads  # the stage's default: one single-threaded actor per CPU
    if not args.skip_table:
        selection_vs_scan(args)
    if not args.skip_pipeline:
        pipeline_vs_bare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
