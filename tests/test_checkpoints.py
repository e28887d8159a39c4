"""Checkpoint loading: rosinality layouts round-trip, unsafe or wrong files fail clearly."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

from mambastyle.checkpoints import file_sha256, load_generator, read_checkpoint, save_generator
from mambastyle.errors import CheckpointError
from mambastyle.models.stylegan2 import GeneratorConfig, build_generator, infer_generator_config

# 128 px, channel multiplier 1, cap 256: the channel table (256 at 64 px, 128 at 128 px)
# drops below the cap, so the multiplier is observable from the weights.
CFG = GeneratorConfig(resolution=128, style_dim=32, n_mlp=3, channel_multiplier=1, channel_max=256)
TINY = GeneratorConfig(resolution=16, style_dim=16, n_mlp=2, channel_multiplier=1, channel_max=8)


def rosinality_file(path, g, *, latent_avg=True, training_state=True):
    """Writes a checkpoint the way rosinality's train.py / convert_weight.py do."""
    sd = g.state_dict()
    ckpt = {"g_ema": sd}
    if latent_avg:
        ckpt["latent_avg"] = g.latent_avg.clone()
    if training_state:
        opt = torch.optim.Adam(g.parameters(), lr=0.002, betas=(0.0, 0.99))
        ckpt.update(
            g=sd,
            d={"convs.0.0.weight": torch.randn(4, 3, 1, 1)},
            g_optim=opt.state_dict(),
            d_optim=opt.state_dict(),
            args=argparse.Namespace(size=g.resolution, channel_multiplier=1, iter=800000, path="lmdb"),
        )
    torch.save(ckpt, path)
    return path


def outputs(g, w_plus):
    with torch.no_grad():
        return g.synthesis(w_plus, noise_mode="const")


def test_rosinality_key_layout_is_exact():
    g = build_generator(TINY)
    expected = {
        "input.input",
        "noises.noise_0",
        "noises.noise_1",
        "noises.noise_2",
        "noises.noise_3",
        "noises.noise_4",
    }
    expected |= {f"style.{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    styled = [
        "conv.weight",
        "conv.modulation.weight",
        "conv.modulation.bias",
        "noise.weight",
        "activate.bias",
    ]
    rgb = ["conv.weight", "conv.modulation.weight", "conv.modulation.bias", "bias"]
    expected |= {f"conv1.{k}" for k in styled} | {f"to_rgb1.{k}" for k in rgb}
    for j in range(2):  # 8 px and 16 px blocks
        expected |= {f"convs.{2 * j}.{k}" for k in styled} | {f"convs.{2 * j}.conv.blur.kernel"}
        expected |= {f"convs.{2 * j + 1}.{k}" for k in styled}
        expected |= {f"to_rgbs.{j}.{k}" for k in rgb} | {f"to_rgbs.{j}.upsample.kernel"}
    sd = g.state_dict()
    assert set(sd) == expected
    assert sd["conv1.conv.weight"].shape == (1, 8, 8, 3, 3)
    assert sd["to_rgb1.conv.weight"].shape == (1, 3, 8, 1, 1)
    assert sd["to_rgbs.0.bias"].shape == (1, 3, 1, 1)
    assert sd["noises.noise_4"].shape == (1, 1, 16, 16)


@pytest.mark.parametrize("training_state", [False, True])
def test_rosinality_checkpoint_round_trips(tmp_path, training_state):
    g = build_generator(CFG, seed=11)
    g.compute_latent_avg(500)
    path = rosinality_file(tmp_path / "g.pt", g, training_state=training_state)
    loaded = load_generator(path)
    assert loaded.config == CFG  # architecture inferred from the weights alone
    assert loaded.latent_avg_source == "checkpoint"
    assert torch.equal(loaded.latent_avg, g.latent_avg)
    w_plus = torch.randn(2, CFG.n_styles, CFG.style_dim)
    assert torch.equal(outputs(loaded, w_plus), outputs(g, w_plus))
    z = torch.randn(2, CFG.style_dim)
    assert torch.equal(loaded.mapping(z, 0.7), g.mapping(z, 0.7))


def test_our_checkpoint_round_trips_with_config(tmp_path):
    g = build_generator(TINY, seed=1)
    g.compute_latent_avg(100)
    save_generator(g, tmp_path / "sub" / "gen.pt")
    ckpt = read_checkpoint(tmp_path / "sub" / "gen.pt")
    assert set(ckpt) == {"g_ema", "latent_avg", "config"}
    loaded = load_generator(tmp_path / "sub" / "gen.pt", resolution=16)
    assert loaded.config == TINY
    w_plus = torch.randn(3, TINY.n_styles, TINY.style_dim)
    assert torch.equal(outputs(loaded, w_plus), outputs(g, w_plus))
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # atomic write left nothing behind


def test_psp_style_checkpoint_and_bare_state_dict_load(tmp_path):
    g = build_generator(TINY, seed=2)
    g.compute_latent_avg(100)
    w_plus = torch.randn(1, TINY.n_styles, TINY.style_dim)
    psp = {
        "state_dict": {f"decoder.{k}": v for k, v in g.state_dict().items()},
        "latent_avg": g.latent_avg[None],
    }
    psp["state_dict"]["encoder.body.0.weight"] = torch.randn(2, 2)
    torch.save(psp, tmp_path / "psp.pt")
    assert torch.equal(outputs(load_generator(tmp_path / "psp.pt"), w_plus), outputs(g, w_plus))
    torch.save(g.state_dict(), tmp_path / "bare.pt")
    assert torch.equal(outputs(load_generator(tmp_path / "bare.pt"), w_plus), outputs(g, w_plus))


def test_missing_latent_avg_is_computed_deterministically(tmp_path):
    g = build_generator(TINY, seed=4)
    path = rosinality_file(tmp_path / "g.pt", g, latent_avg=False, training_state=False)
    a = load_generator(path, latent_avg_samples=2000)
    b = load_generator(path, latent_avg_samples=2000)
    assert a.latent_avg_source == "computed(2000)"
    assert torch.isfinite(a.latent_avg).all()
    assert torch.equal(a.latent_avg, b.latent_avg)
    z = torch.randn(2000, TINY.style_dim, generator=torch.Generator().manual_seed(0))
    # bound: the same seed-0 draws as compute_latent_avg, which sums in float64; a float32 mean of
    # 2000 rows of |w| ~ 1 is off by ~1e-6, so atol 1e-5 / rtol 1e-4 leave ~10x
    torch.testing.assert_close(a.latent_avg, g.style(z).mean(0), rtol=1e-4, atol=1e-5)


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickle_that_executes_code_is_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"g_ema": {"input.input": torch.zeros(1)}, "x": _Evil(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch's legacy format
    with pytest.raises(CheckpointError, match="refused to load"):
        load_generator(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty"),
        (b"this is a text file, not a checkpoint\n", "not a PyTorch checkpoint"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a PyTorch checkpoint"),
        (b"PK\x03\x04" + bytes(40), "not a PyTorch checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_generator(path)
    assert str(path) in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_generator(tmp_path / "nope.pt")


def test_checkpoint_without_generator_lists_its_keys(tmp_path):
    torch.save({"encoder": {"w": torch.zeros(1)}, "step": 3}, tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="'g_ema'.*encoder, step"):
        load_generator(tmp_path / "enc.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="got list"):
        load_generator(tmp_path / "list.pt")


def test_wrong_resolution_is_named(tmp_path):
    path = rosinality_file(tmp_path / "g.pt", build_generator(TINY), training_state=False)
    with pytest.raises(CheckpointError, match="16-px generator .*but 64 px was asked for"):
        load_generator(path, resolution=64)


def test_missing_and_misshaped_keys_are_named(tmp_path):
    sd = build_generator(TINY).state_dict()
    del sd["convs.1.noise.weight"]
    sd["to_rgbs.0.conv.modulation.bias"] = torch.zeros(5)
    torch.save({"g_ema": sd}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError) as exc:
        load_generator(tmp_path / "g.pt")
    msg = str(exc.value)
    assert "missing keys: convs.1.noise.weight" in msg
    assert "to_rgbs.0.conv.modulation.bias (5,)" in msg
    sd = build_generator(TINY).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"g_ema": sd}, tmp_path / "g2.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: extra.weight"):
        load_generator(tmp_path / "g2.pt")


def test_not_a_generator_state_dict():
    with pytest.raises(CheckpointError, match="missing input.input"):
        infer_generator_config({"conv1.conv.weight": torch.zeros(1)})


def test_bad_latent_avg_is_rejected(tmp_path):
    g = build_generator(TINY)
    torch.save({"g_ema": g.state_dict(), "latent_avg": torch.zeros(3, 7)}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="latent_avg must be a \\(16,\\) tensor"):
        load_generator(tmp_path / "g.pt")


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == file_sha256(b"abc")
    assert file_sha256(b"abc").startswith("ba7816bf")


# --------------------------------------------------------------------------- encoders


def _tiny_encoder(seed=0):
    from mambastyle.models.encoders import build_encoder

    enc = build_encoder("mambastyle_tiny", 64, seed=seed, input_size=64)
    enc.set_latent_avg(torch.randn(512))
    return enc


def test_encoder_checkpoint_round_trips_from_the_file_alone(tmp_path):
    from mambastyle.checkpoints import load_encoder, save_encoder

    enc = _tiny_encoder().eval()
    gen = {"sha256": "ab" * 32, "resolution": 64, "n_styles": 10}
    save_encoder(enc, tmp_path / "enc.pt", generator=gen, step=12, extra={"rng": torch.get_rng_state()})
    loaded, meta = load_encoder(tmp_path / "enc.pt")
    assert meta["generator"] == gen and meta["step"] == 12 and "rng" in meta
    assert loaded.config == enc.config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), enc(x))


class _Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: the model lives in `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_encoder_checkpoint_is_saved_unwrapped(tmp_path):
    from mambastyle.checkpoints import encoder_payload, load_encoder, save_encoder, unwrap_state_dict

    enc = _tiny_encoder()
    payload = encoder_payload(_Wrapper(enc))
    assert not any(k.startswith("module.") for k in payload["state_dict"])
    assert unwrap_state_dict({"_orig_mod.module.a.weight": 1}) == {"a.weight": 1}
    # a checkpoint whose keys still carry wrapper prefixes loads too
    payload["state_dict"] = {f"module.{k}": v for k, v in payload["state_dict"].items()}
    torch.save(payload, tmp_path / "wrapped.pt")
    loaded, _ = load_encoder(tmp_path / "wrapped.pt")
    assert torch.equal(loaded.latent_avg, enc.latent_avg)
    with pytest.raises(ValueError, match="overwrite"):
        save_encoder(enc, tmp_path / "x.pt", extra={"config": {}})


def test_bad_encoder_checkpoints(tmp_path):
    from mambastyle.checkpoints import encoder_payload, load_encoder

    rosinality_file(tmp_path / "gen.pt", build_generator(TINY), training_state=False)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_encoder(tmp_path / "gen.pt")
    payload = encoder_payload(_tiny_encoder())
    torch.save({**payload, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_encoder(tmp_path / "v99.pt")
    torch.save({**payload, "config": {**payload["config"], "d_state": 4}}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_encoder(tmp_path / "mismatch.pt")
    torch.save({**payload, "config": {**payload["config"], "arch": "resnet"}}, tmp_path / "arch.pt")
    with pytest.raises(CheckpointError, match="invalid encoder config"):
        load_encoder(tmp_path / "arch.pt")
    marker = tmp_path / "pwned"
    torch.save({**payload, "evil": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_encoder(tmp_path / "evil.pt")
    assert not marker.exists()
