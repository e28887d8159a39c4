"""Helpers shared by the tests: the repository, free ports, params with a tiny generator,
fake shards and latent tables. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from mambastyle.config import Params, parse_params
from mambastyle.data.shards import Sample, build_shard
from mambastyle.latents import build_part, commit, schema, table_metadata, write_part
from mambastyle.storage import Location, write_bytes

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A generator whose style space is as wide as W (style_dim = channels), so codes are
# recoverable from images, and small enough for CPU tests.
TINY_GENERATOR = {"resolution": 32, "style_dim": 32, "n_mlp": 2, "channel_multiplier": 1, "channel_max": 32,
                  "lr_mlp": 0.01, "blur_kernel": [1, 3, 3, 1]}  # fmt: skip


def params(**sections) -> Params:
    """The repo's params.yaml with nested overrides, e.g. ``params(train={"steps": 5})``."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["generator"]["architecture"] = dict(TINY_GENERATOR)
    data["generator"]["latent_avg_samples"] = 2000
    data["train"].update(input_size=32, batch_size=4, log_every=2, eval_every=4, eval_samples=8,
                         checkpoint_every=4, image_every=0)  # fmt: skip
    # the W+ path unless a test asks for the fuser (fuser={"enabled": True}, edit={"mode": "fuser"})
    data["fuser"].update(
        enabled=False, log_every=2, eval_every=4, eval_images=4, checkpoint_every=4, image_every=0
    )
    data["edit"]["mode"] = "w_plus"
    data = _merge(data, sections)
    return parse_params(data)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def png(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    root: Location, counts: dict[str, list[int]], size: int = 32, seed: int = 0
) -> dict[str, bytes]:
    """Shards of random images under ``root/shards`` with a manifest like the prepare stage's.

    ``counts`` maps a split to its shards' sample counts. Returns {key: png bytes}.
    """
    rng = np.random.default_rng(seed)
    entries, images = [], {}
    for split, shard_counts in counts.items():
        for index, n in enumerate(shard_counts):
            samples = []
            for i in range(n):
                key = f"{split}_{index:02d}_{i:03d}"
                images[key] = png(rng, size)
                samples.append(Sample.of(key, split, images[key], {"split": split}))
            data = build_shard(samples)
            path = f"{split}/{split}-{index:06d}.tar"
            write_bytes(root.join("shards", path), data, durable=False)
            entries.append({"path": path, "split": split, "samples": n, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    manifest = {"version": 1, "shards": entries}
    write_bytes(root.join("shards", "manifest.json"), json.dumps(manifest).encode(), durable=False)
    return images


def cmdline(proc) -> list[str]:
    """A process's command line, or [] when it is gone or not ours to read."""
    import psutil

    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


META = {"encoder_sha256": "e" * 64, "generator_sha256": "g" * 64, "run_id": "run-test"}


def make_table(prefix, n_per_split=(30, 10), n_styles=4, style_dim=8, seed=0, row_group_size=8):
    rng = np.random.default_rng(seed)
    s = schema(n_styles, style_dim, META)
    parts, truth = [], {}
    for split, n in zip(("train", "test"), n_per_split, strict=True):
        w = rng.standard_normal((n, n_styles, style_dim)).astype(np.float32)
        keys = [f"{split}_{i:04d}" for i in range(n)]
        yaw = rng.uniform(-40, 40, n).astype(np.float32)
        rows = {"key": keys, "shard": [f"{split}-000000.tar"] * n, "w_plus": w, "mse": rng.random(n),
                "yaw": yaw, "source": [f"photos/{k}.jpg" for k in keys]}  # fmt: skip
        path = f"split={split}/part-000000.parquet"
        write_part(build_part(rows, s), prefix.join(path), row_group_size)
        parts.append({"path": path, "split": split, "rows": n})
        truth.update({k: (w[i], float(yaw[i]), split) for i, k in enumerate(keys)})
    commit(prefix, parts, table_metadata(s))
    return truth


def kill_when(proc, ready, timeout_s: float = 300.0) -> None:
    """Waits until ``ready()`` holds (polled every 20 ms), then SIGKILLs ``proc`` and every process
    it started (a stage's local Ray included), by their ids. Fails the test when the process
    ended first: the kill was meant to land mid-run."""
    import signal
    import time

    import psutil
    import pytest

    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed mid-run:\n{proc.stderr.read()[-3000:]}")
    finally:
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=60)
        psutil.wait_procs(family, timeout=60)


def fuser_bytes(g) -> bytes:
    """A fuser checkpoint for generator ``g``: a tiny encoder and fuser, seeded, whose correction
    visibly changes the picture."""
    import io

    import torch

    from mambastyle.checkpoints import fuser_payload, state_sha256
    from mambastyle.models.encoders import build_encoder
    from mambastyle.models.fuser import build_fuser

    enc = build_encoder("mambastyle_tiny", g.resolution, seed=1, input_size=32, style_dim=g.style_dim)
    enc.set_latent_avg(g.latent_avg)
    fuser = build_fuser("fuser_tiny", enc.config, g.config, seed=3)
    torch.nn.init.normal_(fuser.out.weight, std=0.05)
    ident = {"sha256": state_sha256(g), "resolution": g.resolution, "n_styles": g.n_styles}
    buf = io.BytesIO()
    torch.save(fuser_payload(enc, fuser, generator=ident, step=1), buf)
    return buf.getvalue()
