"""Edit stage throughput against the bare generator, both measured in the same run.

Edited images/s through the whole Ray Data job (selection -> actor pool applying the edits and
rendering -> PNG encoding -> WebDataset shards and Parquet edits table -> committed manifest)
vs the bare generator forward (``synthesis``) on the same number of codes, batch size and
threads (timed before and after the job, averaged), with the allocator settings the job's
actors get (the script restarts itself with them where unset). The job runs as the stage does
on CPUs: its actors share the CPUs out as threads (default one actor of ``--threads``),
over a latent table of ``--units`` source shards, a tar of ``--images-per-shard`` images per
actor call. Target ratio >= 0.85.

Usage:
    .venv/bin/python benchmarks/edit.py [--rows 512] [--strengths 4] [--resolution 128]
                                        [--style-dim 256] [--batch-size 16] [--threads 2]
                                        [--actors 1] [--units 4] [--images-per-shard 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

META = {"encoder_sha256": "-", "generator_sha256": "-", "run_id": "bench"}


def latent_table(uri: str, w: np.ndarray, units: int):
    """A latent table of the codes ``w`` (n, n_styles, style_dim) at ``uri``: one part per
    source shard, ``units`` of them, as the invert stage writes it."""
    from mambastyle.latents import build_part, commit, schema, table_metadata, write_part
    from mambastyle.storage import resolve

    prefix = resolve(uri)
    part_schema = schema(w.shape[1], w.shape[2], META)
    entries = []
    for u, rows in enumerate(np.array_split(np.arange(len(w)), units)):
        shard, path = f"test-{u:06d}.tar", f"split=test/test_{u:06d}-bench.parquet"
        part = {"key": [f"k{i:06d}" for i in rows], "shard": [shard] * len(rows), "w_plus": w[rows]}
        write_part(build_part(part, part_schema), prefix.join(path), 1024)
        entries.append({"path": path, "split": "test", "rows": len(rows), "shard": shard})
    commit(prefix, entries, table_metadata(part_schema))
    return prefix


def main() -> int:
    from allocator import restart_with_allocator_env

    restart_with_allocator_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=512, help="selected rows (x strengths: images to amortise start-up)"
    )
    parser.add_argument("--strengths", type=int, default=4, help="strengths per row (images per row)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--style-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--actors", type=int, default=1, help="actors, threads // actors threads each (as the stage: 1)"
    )
    parser.add_argument("--units", type=int, default=4, help="source shards of the latent table")
    parser.add_argument("--images-per-shard", type=int, default=64, help="images per tar (per actor call)")
    parser.add_argument("--output", choices=["shards", "folder"], default="shards")
    args = parser.parse_args()
    actors = args.actors

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from mambastyle.config import load_params
    from mambastyle.directions import Direction
    from mambastyle.edit.core import Edit, apply_edits
    from mambastyle.edit.pipeline import EditJob, run_edits
    from mambastyle.generate import resolve_generator
    from mambastyle.latents import open_table
    from mambastyle.runtime import connect_ray
    from mambastyle.storage import StorageOptions

    gp = load_params().generator
    arch = dataclasses.replace(gp.architecture, resolution=args.resolution, style_dim=args.style_dim,
                               channel_max=args.style_dim)  # fmt: skip
    gp = dataclasses.replace(gp, architecture=arch, latent_avg_samples=1000)
    g = resolve_generator(None, arch, gp.init_seed, gp.latent_avg_samples)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        z = torch.from_numpy(rng.standard_normal((args.rows, args.style_dim), dtype=np.float32))
        w = g.mapping(z, 0.7)[:, None].expand(-1, g.n_styles, -1).contiguous().numpy()
    vector = rng.standard_normal((g.n_styles, args.style_dim)).astype(np.float32)
    edit = Edit("bench", Direction(vector / np.linalg.norm(vector[0]), "bench", "-"),
                tuple(float(s) for s in np.linspace(-2, 2, args.strengths)))  # fmt: skip
    edited, _ = apply_edits(w, [edit])
    n_images = len(edited)

    torch.set_num_threads(args.threads)

    @torch.no_grad()
    def bare_run() -> float:
        t0 = time.perf_counter()
        for i in range(0, n_images, args.batch_size):
            g.synthesis(torch.from_numpy(edited[i : i + args.batch_size]), noise_mode="const")
        return time.perf_counter() - t0

    with torch.no_grad():
        g.synthesis(torch.from_numpy(edited[: args.batch_size]), noise_mode="const")  # warm-up
    before = bare_run()

    connect_ray(None, num_cpus=args.threads)  # as the edit stage starts its local Ray
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        prefix = latent_table(f"{tmp}/latents/bench", w, args.units)
        job = EditJob(out=f"{tmp}/edits", options=StorageOptions(), generator=gp, edits=(edit,),
                      shape=(g.n_styles, args.style_dim), batch_size=args.batch_size, num_actors=actors,
                      use_gpu=False, output=args.output, images_per_shard=args.images_per_shard,
                      row_group_size=1024, rows_per_file=100_000, metadata=META,
                      cpus_per_actor=args.threads // actors,
                      table=prefix.uri, where="true")  # fmt: skip
        t0 = time.perf_counter()
        manifest = run_edits(job, open_table(prefix.uri))
        whole = time.perf_counter() - t0
        assert manifest["rows"] == n_images
    ray.shutdown()
    after = bare_run()  # the baseline again: this machine's speed drifts by ~10% over minutes
    bare = (before + after) / 2
    print(f"{args.rows} rows x {args.strengths} strengths = {n_images} images, {args.resolution}px "
          f"(style_dim {args.style_dim}), batch {args.batch_size}, {args.threads} threads "
          f"({actors} actors of {args.threads // actors}), {args.units} units, {args.output}")  # fmt: skip
    print(f"   bare generator forward: {n_images / bare:7.2f} img/s  (mean of before/after: "
          f"{n_images / before:.2f}, {n_images / after:.2f})")  # fmt: skip
    print(
        f"   whole edit job:         {n_images / whole:7.2f} img/s  (incl. actor start, PNG, shards, Parquet)"
    )
    print(f"   beyond the bare forward: {whole - bare:.1f} s of {whole:.1f} s (actor start, reads, commit)")
    print(f"   ratio job/bare:         {bare / whole:.3f}  (target >= 0.85)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
