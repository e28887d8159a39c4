"""The invert stage on Ray Data: shards (local or moto S3) -> a committed latent table."""

from __future__ import annotations

import dataclasses
import io
import threading
import time

import numpy as np
import psutil
import pyarrow.dataset as pads
import pytest
import torch
from helpers import cmdline, params, write_shards
from PIL import Image

from mambastyle.checkpoints import load_encoder, save_encoder, state_sha256
from mambastyle.generate import resolve_generator
from mambastyle.invert.pipeline import InvertError, default_actors, invert_from_params
from mambastyle.latents import open_table
from mambastyle.models.encoders import build_encoder
from mambastyle.models.inversion import invert_batch
from mambastyle.runstats import TABLE_STATS_NAME
from mambastyle.storage import StorageOptions, list_files, resolve, write_bytes

pytestmark = pytest.mark.slow

COUNTS = {"train": [6, 5], "val": [3], "test": [4]}


def _encoder_bytes(resolution: int = 32) -> bytes:
    p = params()
    arch = p.generator.architecture
    if resolution != arch.resolution:
        import dataclasses

        arch = dataclasses.replace(arch, resolution=resolution)
    g = resolve_generator(None, arch, p.generator.init_seed, p.generator.latent_avg_samples)
    enc = build_encoder("mambastyle_tiny", resolution, seed=1, input_size=32, style_dim=g.style_dim)
    enc.set_latent_avg(g.latent_avg)
    buf = io.BytesIO()
    save_encoder(
        enc, buf, generator={"sha256": state_sha256(g), "resolution": resolution, "n_styles": g.n_styles}
    )
    return buf.getvalue()


def _setup(root_uri: str, options: StorageOptions | None = None, endpoint: str | None = None, counts=COUNTS,
           **invert):  # fmt: skip
    root = resolve(root_uri, options)
    images = write_shards(root, counts)
    write_bytes(root.join("encoder.pt"), _encoder_bytes(), durable=False)
    invert = {"encoder": root.join("encoder.pt").uri, "batch_size": 4, "rows_per_file": 5, **invert}
    p = params(storage={"root": root_uri, "endpoint_url": endpoint}, invert=invert)
    return p, images


def _decode(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy()).permute(2, 0, 1)


def test_table_is_complete_matches_the_core_and_reruns_idempotently(tmp_path, ray_local):
    p, images = _setup(str(tmp_path / "data"))
    manifest, prefix = invert_from_params(p, ray_connect=False)
    t = open_table(prefix.uri)
    table = t.to_table()
    keys = table.column("key").to_pylist()
    assert manifest["rows"] == len(keys) == len(set(keys)) == len(images) and set(keys) == set(images)
    assert manifest["splits"] == {"test": 4, "train": 11, "val": 3}
    assert t.shape == (8, 32) and t.metadata["metrics"] == "mse,ssim"
    # the core function on the same images, with the same checkpoint, gives the same codes
    encoder, _ = load_encoder(str(tmp_path / "data" / "encoder.pt"))
    want = invert_batch(encoder, torch.stack([_decode(images[k]) for k in keys])).w_plus
    # bound: the actors' batches of 4 on one thread vs one batch here: float32 rounding only, measured
    # <= 2.4e-7 on codes < 2 (atol 1e-5 is 40x)
    np.testing.assert_allclose(t.w_plus(table), want, atol=1e-5, rtol=0)
    # bound: inputs lie in [-1, 1], so a reconstruction in range scores < 4; measured up to 1.8
    assert all(0 < v < 4 for v in table.column("mse").to_pylist())
    # queries: DuckDB (SQL) and pandas (pyarrow filter) give the expected rows
    got = t.query("SELECT key FROM latents WHERE split = 'test' ORDER BY key").column("key").to_pylist()
    assert got == sorted(k for k in images if k.startswith("test"))
    df = t.to_pandas(filter=pads.field("split") == "val", columns=["key", "mse"])
    assert sorted(df["key"]) == sorted(k for k in images if k.startswith("val"))
    files = sorted(list_files(prefix))
    # a re-run replaces the table: same rows, no duplicates, no stray files
    manifest2, prefix2 = invert_from_params(p, ray_connect=False)
    assert prefix2.uri == prefix.uri and manifest2["rows"] == manifest["rows"]
    again = open_table(prefix.uri).to_table(columns=["key", "w_plus"])
    assert sorted(again.column("key").to_pylist()) == sorted(keys)
    # Which write task gets which rows varies between runs, so part names may differ; but the
    # old parts are gone: the files present are exactly the new manifest's.
    listed = {prefix.join(part["path"]).path for part in manifest2["parts"]}
    own = {prefix.join(n).path for n in ("_manifest.json", TABLE_STATS_NAME)}
    assert set(list_files(prefix)) == listed | own
    assert files and all(f.endswith((".parquet", "_manifest.json", TABLE_STATS_NAME)) for f in files)


def test_default_actors_are_one_per_cpu_or_one_per_gpu(ray_local):
    # params.yaml's invert.num_actors is null, so the tests above ran two single-threaded actors
    assert default_actors(use_gpu=False) == 2
    assert default_actors(use_gpu=True) == 1  # no GPU in this Ray: one actor, waiting for one


def test_table_on_s3(s3, ray_local):
    endpoint, bucket = s3
    options = StorageOptions(endpoint_url=endpoint)
    p, images = _setup(f"s3://{bucket}/data", options, endpoint)
    manifest, prefix = invert_from_params(p, ray_connect=False)
    assert prefix.uri.startswith(f"s3://{bucket}/data/latents/run-")
    t = open_table(prefix.uri, options)
    assert t.query("SELECT count(DISTINCT key) AS n FROM latents").column("n")[0].as_py() == len(images)


def test_corrupt_shard_is_named_and_nothing_committed(tmp_path, ray_local):
    p, _ = _setup(str(tmp_path / "data"))
    shard = tmp_path / "data/shards/train/train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(InvertError, match="train-000001.tar"):
        invert_from_params(p, ray_connect=False)
    assert not list((tmp_path / "data").glob("latents/*/_manifest.json"))


def test_undecodable_image_in_an_intact_shard_is_named(tmp_path, ray_local):
    # the shard keeps its size and stays a valid tar: one PNG member's header is broken
    p, _ = _setup(str(tmp_path / "data"))
    shard = tmp_path / "data/shards/train/train-000001.tar"
    data = shard.read_bytes()
    assert data.count(b"IHDR") > 1
    shard.write_bytes(data.replace(b"IHDR", b"IHDX", 1))
    with pytest.raises(InvertError, match=r"train-000001\.tar#[^ ]+\.png: undecodable PNG"):
        invert_from_params(p, ray_connect=False)
    assert not list((tmp_path / "data").glob("latents/*/_manifest.json"))


def test_encoder_for_another_generator_resolution_is_refused(tmp_path, ray_local):
    p, _ = _setup(str(tmp_path / "data"))
    (tmp_path / "data" / "encoder.pt").write_bytes(_encoder_bytes(resolution=64))
    with pytest.raises(InvertError, match="encoder.pt: the encoder was made for a 64-px generator"):
        invert_from_params(p, ray_connect=False)
    p2 = params(storage={"root": str(tmp_path / "data")}, invert={"encoder": str(tmp_path / "missing.pt")})
    with pytest.raises(InvertError, match="missing.pt"):
        invert_from_params(p2, ray_connect=False)


def test_an_official_restyle_file_is_the_encoder_and_the_generator(tmp_path, ray_local):
    """A ReStyle-e4e training checkpoint (narrow, random weights) as invert.encoder, its decoder
    as generator.checkpoint: the table holds the official iterative codes."""
    seed = 23
    root = tmp_path / "data"
    images = write_shards(resolve(str(root)), COUNTS)
    base = params()
    g = resolve_generator(None, base.generator.architecture, seed, 100)
    narrow = {"widths": (16, 32, 64, 128), "units": (1, 1, 2, 1)}
    enc = build_encoder("restyle_e4e", g.resolution, seed=seed, style_dim=g.style_dim, **narrow)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in g.state_dict().items()})
    opts = {"encoder_type": "ProgressiveBackboneEncoder", "input_nc": 6, "output_size": g.resolution}
    ckpt = {"state_dict": sd, "opts": opts, "latent_avg": g.latent_avg.repeat(g.n_styles, 1)}
    torch.save(ckpt, tmp_path / "r.pt")
    generator = {"checkpoint": str(tmp_path / "r.pt")}
    p = params(storage={"root": str(root)}, generator=generator,
               invert={"encoder": str(tmp_path / "r.pt"), "batch_size": 4, "rows_per_file": 5})  # fmt: skip
    manifest, prefix = invert_from_params(p, ray_connect=False)
    t = open_table(prefix.uri)
    table = t.to_table()
    keys = table.column("key").to_pylist()
    assert manifest["rows"] == len(images) and t.shape == (g.n_styles, g.style_dim)
    official, meta = load_encoder(str(tmp_path / "r.pt"))
    assert meta["layout"] == "restyle_e4e" and official.config.n_iters == 5
    want = invert_batch(official, torch.stack([_decode(images[k]) for k in keys]), pad_to=4).w_plus
    # bound: 5 refinement steps through other batches/threads: measured <= 2.4e-7 (atol 1e-4 is 400x)
    np.testing.assert_allclose(t.w_plus(table), want, atol=1e-4, rtol=0, err_msg=f"seed {seed}")


def test_a_killed_actor_fails_the_run_cleanly_and_the_rerun_completes_it(tmp_path, ray_local):
    # On the local instance actors are not restarted (runtime.worker_options): a worker that dies
    # at work fails the run, naming the dead worker, with nothing committed; what the run wrote
    # before stays staged and the re-run computes the rest.
    # enough work that the actor is still at it when it is killed, as soon as it is ready
    p, images = _setup(str(tmp_path / "data"), counts={"train": [40] * 6}, batch_size=1)
    killed = threading.Event()
    kills = []
    seen: dict[int, float] = {}  # actor pid -> its CPU seconds when first seen ALIVE

    def kill_once():
        from ray._private.state import actors

        deadline = time.time() + 60
        while not killed.is_set() and time.time() < deadline:
            # An actor at work: past its constructor (ALIVE) and past Ray Data's readiness call,
            # which only then hands it batches. One that dies before that counts as a failed
            # start, which Ray Data replaces, and the run would succeed. Batches are what use CPU
            # once it is ALIVE: 0.3 s of them (the readiness call takes milliseconds) means it
            # holds batches, in flight or queued, which then fail with it.
            alive = {a["Pid"] for a in actors().values() if a["State"] == "ALIVE"
                     and "Inverter" in a["ActorClassName"]}  # fmt: skip
            for proc in psutil.Process().children(recursive=True):  # only this test's Ray
                if proc.pid in alive and "MapBatches(Inverter)" in " ".join(cmdline(proc)):
                    try:
                        used = sum(proc.cpu_times()[:2])
                        if used - seen.setdefault(proc.pid, used) < 0.3:
                            continue
                        proc.kill()
                    except psutil.NoSuchProcess:
                        continue  # it already finished: the assertion below reports that
                    kills.append(proc.pid)
                    killed.set()
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once)
    killer.start()
    try:
        with pytest.raises(InvertError, match="worker process has died"):
            invert_from_params(p, ray_connect=False)
    finally:
        killed.set()
        killer.join()
    assert kills, "the actor was never killed: the test proved nothing"
    assert not list((tmp_path / "data" / "latents").glob("run-*/_manifest.json"))
    manifest, prefix = invert_from_params(p, ray_connect=False)
    keys = open_table(prefix.uri).to_table(columns=["key"]).column("key").to_pylist()
    assert manifest["rows"] == len(keys) == len(set(keys)) == len(images)
    assert manifest["computed"] + manifest["resumed"] == len(images)


def test_a_bf16_table_is_its_own_run_near_the_fp32_codes(tmp_path, ray_local):
    p, images = _setup(str(tmp_path / "data"), counts={"train": [6]})
    _, fp32 = invert_from_params(p, ray_connect=False)
    p16 = dataclasses.replace(p, invert=dataclasses.replace(p.invert, precision="bf16"))
    manifest, bf16 = invert_from_params(p16, ray_connect=False)
    assert bf16.uri != fp32.uri and manifest["computed"] == len(images)  # nothing reused from fp32
    a, b = open_table(fp32.uri), open_table(bf16.uri)
    assert b.metadata["precision"] == "bf16" and "precision" not in a.metadata
    ta, tb = a.to_table().sort_by("key"), b.to_table().sort_by("key")
    wa, wb = a.w_plus(ta), b.w_plus(tb)
    # bound: as test_invert's bf16 test (measured <= 0.7% of the codes' spread); 2%
    assert np.linalg.norm(wb - wa) / np.linalg.norm(wa - wa.mean(0)) < 0.02
