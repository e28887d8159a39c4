"""Fuser training: edit sampling, the held-out gain over W+ alone, exact resume, checkpoints, Ray Train."""

from __future__ import annotations

import copy
import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import params, write_shards
from PIL import Image

from mambastyle.checkpoints import fuser_payload, load_fuser, save_encoder
from mambastyle.config import FuserDirectionParams, LossParams
from mambastyle.errors import CheckpointError
from mambastyle.generate import resolve_generator
from mambastyle.models.encoders import build_encoder
from mambastyle.models.fuser import FuserModel, build_fuser
from mambastyle.train.fuser import EditSampler, FuserTrainer, image_with_fuser
from mambastyle.train.loop import Trainer, resize, to_unit_range
from mambastyle.train.losses import TrainingLoss


def _generator(res: int = 32):
    p = params()
    arch = dataclasses.replace(p.generator.architecture, resolution=res)
    return resolve_generator(None, arch, 0, 2000)


def _fuser_trainer(g, encoder, **fuser):
    fp = dataclasses.replace(params().fuser, **{"batch_size": 4, "real_every": 0, **fuser})
    model = FuserModel(encoder, build_fuser("fuser_tiny", encoder.config, g.config, seed=0))
    return FuserTrainer(model, g, TrainingLoss(LossParams(1, 0, 0, 0, 0)), fp, EditSampler(g, fp.directions))


def _encoder(g, seed=0):
    enc = build_encoder(
        "mambastyle_tiny", g.resolution, seed=seed, input_size=g.resolution, style_dim=g.style_dim
    )
    enc.set_latent_avg(g.latent_avg)
    return enc


def _family(source, strength, layers=None, uri=None, component=None):
    return FuserDirectionParams(source, uri, component, strength, layers)


def test_edit_sampler_draws_each_family_with_its_units_and_layers(tmp_path):
    g = _generator()
    s, d = g.n_styles, g.style_dim
    vec = np.random.default_rng(0).standard_normal((s, d)).astype(np.float32)
    np.save(tmp_path / "dir.npy", vec)
    comp = np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))[0].T.astype(np.float32)
    np.savez(tmp_path / "pca.npz", lat_mean=np.zeros(d, np.float32), lat_comp=comp, lat_stdev=np.full(d, 2.0))
    fixed = _family("interfacegan", (1.5, 1.5), (2, 5), uri=str(tmp_path / "dir.npy"))
    sampler = EditSampler(g, (fixed,))
    out = sampler.sample(6, torch.Generator().manual_seed(0))
    assert out.shape == (6, s, d)
    # bound: fixed strengths (1.5; -1 x std 2.0) scale float32 vectors exactly: bit-identical (both)
    torch.testing.assert_close(out[:, 2:5], 1.5 * torch.from_numpy(vec[2:5]).expand(6, -1, -1))
    assert not out[:, :2].any() and not out[:, 5:].any()
    ganspace = EditSampler(
        g, (_family("ganspace", (-1.0, -1.0), uri=str(tmp_path / "pca.npz"), component=3),)
    )
    torch.testing.assert_close(ganspace.sample(2, torch.Generator())[0, 0], -2.0 * torch.from_numpy(comp[3]))
    # random: a unit direction per sample, scaled to `strength` standard deviations of W along it
    rand = EditSampler(g, (_family("random", (2.0, 2.0)),))
    out = rand.sample(64, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 0], out[:, -1])  # the same W direction on every layer
    u = F.normalize(out[:, 0], dim=1)
    w = g.mapping(torch.randn(8192, d, generator=torch.Generator().manual_seed(5)))
    std = (w @ u.t()).std(dim=0)
    # bound: two independent samples' std (4096 vs 8192 draws; kurtosis <= 4) differ by ~1.5% sd per
    # direction; the max over 64 directions is 4.9% with these fixed seeds (<= 5.1% over 20 other seed pairs)
    torch.testing.assert_close(out[:, 0].norm(dim=1), 2.0 * std, rtol=0.08, atol=0)
    # draws are reproducible, and different families change the edit, not the stream of draws
    again = rand.sample(64, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def _demo_faces(tmp_path, size: int) -> dict[str, torch.Tensor]:
    from mambastyle.data.demo import demo_inputs
    from mambastyle.data.faces import PrepareConfig
    from mambastyle.data.prepare import prepare
    from mambastyle.storage import resolve

    config = PrepareConfig.from_params(params().prepare)
    manifest = prepare(demo_inputs(), resolve(str(tmp_path / "faces")), config, workers=2)
    faces: dict[str, list[np.ndarray]] = {}
    for entry in manifest["shards"]:
        with tarfile.open(tmp_path / "faces" / "shards" / entry["path"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    img = (
                        Image.open(io.BytesIO(tar.extractfile(member).read()))
                        .convert("RGB")
                        .resize((size, size))
                    )
                    faces.setdefault(entry["split"], []).append(np.asarray(img))
    return {k: torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).contiguous() for k, v in faces.items()}


@pytest.mark.slow
def test_fuser_reconstructs_held_out_demo_faces_better_than_w_plus_at_the_same_budget(tmp_path):
    torch.manual_seed(0)
    faces = _demo_faces(tmp_path, 32)
    train, held_out = faces["train"], torch.cat([faces.get("val", faces["train"][:0]), faces["test"]])
    assert len(held_out) >= 4
    g = _generator(32)
    # an encoder trained W+-only for a while (real demo faces and generator samples)
    tp = dataclasses.replace(params().train, input_size=32, batch_size=8, steps=120, synthetic_ratio=0.5)
    encoder = _encoder(g)
    encoder.feature_adapter.requires_grad_(False)
    trainer = Trainer(encoder, g, TrainingLoss(LossParams(1, 0, 0, 0.005, 1)), tp)
    rng = np.random.default_rng(0)

    def step(t):
        t.train_step(None if t.is_synthetic(t.step) else train[rng.choice(len(train), 8)])

    for _ in range(60):
        step(trainer)
    snapshot = copy.deepcopy(trainer.module)
    x = resize(to_unit_range(held_out), 32)

    def wplus_mse(enc) -> float:
        with torch.no_grad():
            return float(F.mse_loss(g.synthesis(enc.eval()(x)), x))

    before = wplus_mse(copy.deepcopy(snapshot))
    # the same 60 further steps: W+ training continued, or the fuser on the frozen encoder
    for _ in range(60):
        step(trainer)
    continued = wplus_mse(trainer.module)
    fuser = _fuser_trainer(g, snapshot, steps=60, batch_size=8, real_every=2)
    for _ in range(60):
        step(fuser)
    # bound: the W+ path is frozen, so the same figure up to float32 summation order (measured equal)
    assert fuser.evaluate(held_out)["eval/real_mse_wplus"] == pytest.approx(
        before, rel=1e-5
    )  # frozen encoder
    with torch.no_grad():
        fused = float(F.mse_loss(image_with_fuser(g, fuser.module.eval(), x)[0], x))
    # bound: fixed seeds (torch 0, numpy 0); measured fused / before = 0.199 / 0.289 = 0.69; 0.95: a 5% gain
    assert fused < 0.95 * before and fused < continued, (before, continued, fused)


def test_fuser_training_resumes_exactly():
    g = _generator(32)
    a = _fuser_trainer(g, _encoder(g), steps=6)
    for _ in range(3):
        a.train_step()
    state = copy.deepcopy(a.state_dict())
    rest = [a.train_step()["loss/total"] for _ in range(3)]
    b = _fuser_trainer(g, _encoder(g, seed=9), steps=6)  # other weights until restored
    b.load_state_dict(state)
    assert [b.train_step()["loss/total"] for _ in range(3)] == rest
    for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    # the frozen encoder did not move; only its feature adapter trained with the fuser
    fresh = _encoder(g)
    moved = {k for k, v in a.module.encoder.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    assert moved and all(k.startswith("adapt_1.") for k in moved)
    with pytest.raises(ValueError, match="not a mambastyle-fuser-train-state"):
        b.load_state_dict({**state, "format": "mambastyle-train-state"})


def test_fuser_checkpoint_round_trip_and_refusals(tmp_path):
    g = _generator(32)
    enc = _encoder(g)
    fuser = build_fuser("fuser_tiny", enc.config, g.config, seed=2)
    torch.nn.init.normal_(fuser.out.weight, std=0.05)
    path = tmp_path / "fuser.pt"
    torch.save(fuser_payload(enc, fuser, generator={"resolution": 32, "n_styles": g.n_styles}, step=7), path)
    enc2, fuser2, meta = load_fuser(str(path))
    assert meta["step"] == 7 and meta["fuser"]["config"] == fuser.config.to_dict()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = torch.randn(2, g.n_styles, g.style_dim)
    with torch.no_grad():
        want = image_with_fuser(g, FuserModel(enc.eval(), fuser.eval()), x, d)[0]
        got = image_with_fuser(g, FuserModel(enc2, fuser2), x, d)[0]
    assert torch.equal(want, got)
    save_encoder(enc, tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="not a mambastyle fuser checkpoint"):
        load_fuser(str(tmp_path / "encoder.pt"))
    other = build_fuser("fuser_tiny", _encoder(_generator(64)).config, _generator(64).config)
    torch.save(fuser_payload(enc, other), path)
    with pytest.raises(CheckpointError, match="does not fit its encoder"):
        load_fuser(str(path))


@pytest.mark.slow
def test_fuser_on_ray_train_with_two_workers(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from mambastyle.checkpoints import state_sha256
    from mambastyle.runs import FUSER_RUNS_DIR, TrainJob, export_fuser, load_state
    from mambastyle.storage import list_files, resolve
    from mambastyle.train.distributed import fit, fuser_worker

    root = resolve(str(tmp_path / "data"))
    write_shards(root, {"train": [3, 3, 2], "val": [2], "test": [2]})
    fuser_params = {"steps": 8, "batch_size": 2, "real_every": 2, "checkpoint_every": 4, "eval_every": 4,
                    "log_every": 2, "image_every": 8, "cpus_per_worker": 1, "eval_images": 4,
                    "num_workers": 2}  # fmt: skip
    p = params(fuser=fuser_params, storage={"root": root.uri})
    g = resolve_generator(
        None, p.generator.architecture, p.generator.init_seed, p.generator.latent_avg_samples
    )
    enc = build_encoder(
        "mambastyle_tiny", g.resolution, seed=0, input_size=p.train.input_size, style_dim=g.style_dim
    )
    enc.set_latent_avg(g.latent_avg)
    ident = {"sha256": state_sha256(g), "resolution": g.resolution, "n_styles": g.n_styles}
    save_encoder(enc, tmp_path / "encoder.pt", generator=ident)
    job = TrainJob(p.fuser, p.generator, p.storage, "run-fuser-test", runs_dir=FUSER_RUNS_DIR,
                   encoder_uri=str(tmp_path / "encoder.pt"), encoder_sha256="e" * 64,
                   pretrained=p.train.pretrained)  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        result = fit(job, fuser_worker)
    finally:
        ray.shutdown()
        cluster.shutdown()
    import json

    from mambastyle.storage import read_bytes

    history = [
        json.loads(line) for line in read_bytes(job.artifacts.join("metrics.jsonl")).decode().splitlines()
    ]
    assert [m["step"] for m in history] == [2, 4, 6, 8] and all(m["world_size"] == 2 for m in history)
    # gradients averaged by hand kept the replicas identical at every checkpoint
    assert [m["step"] for m in history if m.get("replicas_in_sync") == 1.0] == [4, 8]
    final = history[-1]
    assert {
        "eval/real_mse_wplus",
        "eval/real_mse_fuser",
        "eval/edit_mse_wplus",
        "eval/edit_mse_fuser",
    } <= set(final)
    state = load_state(result.checkpoint)
    assert state["step"] == 8 and state["real_samples"] == 4 * 2  # 4 real steps x batch 2 on each rank
    loc, sha, meta = export_fuser(job, state)
    enc2, fuser2, info = load_fuser(loc.path)
    assert info["generator"]["n_styles"] == g.n_styles and info["fuser_train"]["run"] == "run-fuser-test"
    # the checkpoint names its encoder by content, never by a path of this checkout
    assert (
        str(tmp_path) not in repr(info)
        and info["fuser_train"]["encoder_source"]["sha256"] == job.encoder_sha256
    )
    assert torch.equal(enc2.latent_avg, enc.latent_avg)
    assert list_files(job.artifacts.join("images"))
