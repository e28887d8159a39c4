"""Official training checkpoints (pSp, e4e, ReStyle, MambaStyle): auto-detection, exact codes,
the decoder as a generator, and refusals.

Files are built in each publisher's layout (``state_dict`` with ``encoder.*`` and ``decoder.*``,
``opts`` as a dict or an ``argparse.Namespace``, ``latent_avg`` repeated per style) from this
project's modules with random weights and perturbed BatchNorm statistics. Narrow backbones keep
them small; the loader reads widths and units off the weights, as for the full-size files.

Tolerances: the loaded encoders run the very modules the reference arithmetic uses, and their
codes were measured bit-identical to it (every kind, fixed seeds), so the bare
``assert_close`` calls (float32 default, rtol 1.3e-6) leave only slack for operation order.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from mambastyle.checkpoints import (
    check_encoder_generator,
    load_encoder,
    load_generator,
    read_checkpoint,
    save_encoder,
    weights_sha256,
)
from mambastyle.errors import CheckpointError
from mambastyle.models.encoders import build_encoder
from mambastyle.models.stylegan2 import GeneratorConfig, build_generator

GEN = GeneratorConfig(resolution=32, style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=16)
NARROW = {"widths": (16, 32, 64, 128), "units": (1, 1, 2, 1), "input_size": 256}
KINDS = {
    "psp": ("psp", "GradualStyleEncoder", "output_size"),
    "e4e": ("e4e", "Encoder4Editing", "stylegan_size"),
    "restyle_psp": ("restyle_psp", "BackboneEncoder", "output_size"),
    "restyle_e4e": ("restyle_e4e", "ProgressiveBackboneEncoder", "output_size"),
    "mambastyle": ("mambastyle", None, "output_size"),
}


def randomize(module: torch.nn.Module, gen: torch.Generator, forward=None) -> None:
    """Random weights large enough that a mis-wired path changes the codes, and BatchNorm
    statistics away from (0, 1) so that eval-mode normalisation is exercised.

    With ``forward`` (a function of a batch of images), the statistics are first measured on
    images, as training leaves them, then perturbed: with arbitrary ones the deep IR-SE stages
    wash the input out and the codes barely depend on it, which would hide a mis-wired input.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan**0.5 if p.ndim > 1 else 0.1))
            if name.endswith("A_logs"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 3 + 0.5))
        norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if forward is not None:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
            module.train()
            for _ in range(2):
                forward(images(int(torch.randint(1 << 30, (1,), generator=gen)), 4))
            module.eval()
            for m in norms:
                m.momentum = 0.1
                m.running_mean.add_(torch.randn(m.num_features, generator=gen) * 0.1 * m.running_var.sqrt())
                m.running_var.mul_(torch.rand(m.num_features, generator=gen) * 0.6 + 0.7)
        else:
            for m in norms:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def official_file(path, kind: str, seed: int, *, namespace=False, opts=None, latent_avg="rows", decoder=None):
    """Writes a checkpoint as ``kind``'s official training script saves it; returns (path,
    our encoder with the same weights, the generator, the latent_avg rows)."""
    gen = torch.Generator().manual_seed(seed)
    arch, encoder_type, size_key = KINDS[kind]
    g = decoder or build_generator(GEN, seed=seed)
    enc = build_encoder(arch, GEN.resolution, style_dim=GEN.style_dim, **NARROW)
    if kind.startswith("restyle"):
        randomize(enc, gen, lambda x: enc._step(torch.cat([x, x.flip(-1)], dim=1)))
    else:
        randomize(enc, gen, enc.offsets)
    enc.eval()
    avg = torch.randn(GEN.style_dim, generator=gen)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in g.state_dict().items()})
    if kind == "mambastyle":
        sd["fuser.final_conv.weight"] = torch.randn(4, 4, generator=gen)
    o = {
        "device": "cuda:0",
        "start_from_latent_avg": True,
        size_key: GEN.resolution,
        "dataset_type": "ffhq_encode",
        "input_nc": 6 if kind.startswith("restyle") else 3,
        "n_iters_per_batch": 3,
        "lpips_lambda": 0.8,
    }
    if encoder_type:
        o["encoder_type"] = encoder_type
    o.update(opts or {})
    ckpt = {"state_dict": sd, "opts": argparse.Namespace(**o) if namespace else o, "global_step": 1234}
    if latent_avg == "rows":
        ckpt["latent_avg"] = avg.repeat(enc.n_styles, 1)
    elif latent_avg == "vector":
        ckpt["latent_avg"] = avg.clone()
    torch.save(ckpt, path)
    return path, enc, g, avg


def images(seed: int, n: int = 2) -> torch.Tensor:
    """Images with large-scale structure (noise alone averages out in deep features)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    fine = torch.rand(n, 3, 256, 256, generator=gen) * 2 - 1
    return (F.interpolate(low, size=256, mode="bicubic", align_corners=False) * 0.8 + fine * 0.2).clamp(-1, 1)


def reference_codes(kind: str, enc, g, avg: torch.Tensor, x: torch.Tensor, n_iters: int = 5) -> torch.Tensor:
    """The publishers' inference arithmetic, written out from the modules' parts."""
    with torch.no_grad():
        if kind in ("psp", "mambastyle"):
            codes, _ = enc.offsets(x)
            return codes + avg
        if kind == "e4e":
            c1, c2, c3 = enc._backbone(x)
            p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + enc.latlayer1(
                c2
            )
            p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + enc.latlayer2(
                c1
            )
            w = enc.styles[0](c3).unsqueeze(1).repeat(1, enc.n_styles, 1)
            for i in range(1, enc.n_styles):
                w[:, i] += enc.styles[i](c3 if i < 3 else p2 if i < 7 else p1)
            return w + avg

        def step(inp):
            h = enc.body(enc.input_layer(inp))
            outs = [blk(h) for blk in enc.styles]
            if kind == "restyle_e4e":
                return torch.stack([outs[0]] + [outs[0] + o for o in outs[1:]], dim=1)
            return torch.stack(outs, dim=1)

        def pool(codes):
            return torch.nn.AdaptiveAvgPool2d((256, 256))(g.synthesis(codes, noise_mode="const"))

        rows = avg.expand(enc.n_styles, -1)
        y = pool(rows[None]).expand(x.shape[0], -1, -1, -1)
        latent = None
        for _ in range(n_iters):
            codes = step(torch.cat([x, y], dim=1))
            latent = codes + (rows if latent is None else latent)
            y = pool(latent)
        return latent


@pytest.mark.parametrize("kind", list(KINDS))
def test_official_layouts_load_and_give_the_publishers_codes(tmp_path, kind):
    seed = 100 + list(KINDS).index(kind)
    path, enc, g, avg = official_file(
        tmp_path / f"{kind}.pt", kind, seed, namespace=kind in ("e4e", "restyle_psp")
    )
    loaded, meta = load_encoder(path)
    assert meta["layout"] == kind and meta["adds_latent_avg"], f"seed {seed}"
    assert meta["generator"]["weights_sha256"] == weights_sha256(g)
    assert not loaded.training
    assert set(loaded.state_dict()) == set(enc.state_dict())  # exactly the encoder.* keys
    x = images(seed)
    with torch.no_grad():
        got = loaded(x)
    want = reference_codes(kind, enc, g, avg, x)
    scale = want.abs().max()
    assert got.shape == (2, g.n_styles, GEN.style_dim)
    # bound: fixed seeds; measured identical for every kind (1e-4 of the code scale is slack for op order)
    assert (got - want).abs().max() <= 1e-4 * scale, (
        f"seed {seed}: {(got - want).abs().max()} vs scale {scale}"
    )
    # the codes depend on the image far beyond the tolerance, so a mis-wired path cannot hide
    # bound: measured 0.030 (psp) to 0.11 (mambastyle) of the scale, i.e. 300-1100x the tolerance
    assert (want[0] - want[1]).abs().max() > 100 * 1e-4 * scale, f"seed {seed}"
    if kind in ("psp", "e4e", "mambastyle"):  # a batch of one gives the same codes (eval-mode BatchNorm)
        with torch.no_grad():
            # bound: batch size changes float32 kernel rounding only: measured <= 8e-8 of the scale
            torch.testing.assert_close(loaded(x[:1]), got[:1], rtol=1e-4, atol=1e-4 * float(scale))


def test_restyle_steps_follow_n_iters_and_differ(tmp_path):
    path, enc, g, avg = official_file(tmp_path / "r.pt", "restyle_psp", 7)
    x = images(7, 1)
    one, _ = load_encoder(path, n_iters=1)
    three, _ = load_encoder(path, n_iters=3)
    with torch.no_grad():
        a, b = one(x), three(x)
    torch.testing.assert_close(a, reference_codes("restyle_psp", enc, g, avg, x, n_iters=1))
    # bound: two more steps move the codes by 0.71 (measured, |codes| < 2.7), far above allclose's 1e-5
    assert not torch.allclose(a, b), "refinement steps must change the codes"
    assert three.config.n_iters == 3 and load_encoder(path)[0].config.n_iters == 5


def test_latent_avg_follows_the_official_opts(tmp_path):
    path, enc, g, avg = official_file(
        tmp_path / "p.pt", "psp", 3, opts={"start_from_latent_avg": False}, latent_avg=None
    )
    loaded, meta = load_encoder(path)
    x = images(3, 1)
    assert not meta["adds_latent_avg"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), enc.offsets(x)[0])
    # a (512,) latent_avg (as some files store it) broadcasts over the styles
    path, enc, g, avg = official_file(tmp_path / "v.pt", "mambastyle", 4, latent_avg="vector")
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(path)[0](x), enc.offsets(x)[0] + avg)


def test_the_decoder_is_the_generator_and_a_different_one_is_refused(tmp_path):
    path, enc, g, avg = official_file(tmp_path / "e4e.pt", "e4e", 11)
    encoder, meta = load_encoder(path)
    same = load_generator(path)  # generator.checkpoint may be the encoder's own file
    assert weights_sha256(same) == weights_sha256(g)
    torch.testing.assert_close(same.latent_avg, avg)
    check_encoder_generator(meta, same, str(path), str(path))
    other = build_generator(GEN, seed=12)
    with pytest.raises(
        CheckpointError, match=r"e4e\.pt: its decoder .* differs from the configured generator other\.pt"
    ):
        check_encoder_generator(meta, other, str(path), "other.pt")
    wider = build_generator(
        GeneratorConfig(resolution=64, style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=16)
    )
    with pytest.raises(CheckpointError, match="32-px generator"):
        check_encoder_generator(meta, wider, str(path), "wide.pt")


def test_namespace_opts_load_without_running_code(tmp_path):
    path, *_ = official_file(tmp_path / "ns.pt", "psp", 5, namespace=True)
    assert load_encoder(path)[1]["opts"]["encoder_type"] == "GradualStyleEncoder"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ckpt = read_checkpoint(path)
    ckpt["opts"] = argparse.Namespace(encoder_type="GradualStyleEncoder", hook=Evil())
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_encoder(tmp_path / "evil.pt")


def test_refusals(tmp_path):
    path, *_ = official_file(tmp_path / "ok.pt", "psp", 21)
    ckpt = torch.load(path, weights_only=True)

    def write(name, value):
        torch.save(value, tmp_path / name)
        return tmp_path / name

    no_type = {**ckpt, "opts": {k: v for k, v in ckpt["opts"].items() if k != "encoder_type"}}
    with pytest.raises(CheckpointError, match="cannot be told apart"):
        load_encoder(write("notype.pt", no_type))
    with pytest.raises(CheckpointError, match="'ResNetGradualStyleEncoder' is not supported"):
        load_encoder(
            write(
                "resnet.pt", {**ckpt, "opts": {**ckpt["opts"], "encoder_type": "ResNetGradualStyleEncoder"}}
            )
        )
    with pytest.raises(CheckpointError, match="without decoder"):
        sd = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("decoder.")}
        load_encoder(write("nodec.pt", {**ckpt, "state_dict": sd}))
    with pytest.raises(CheckpointError, match=r"encoder\.\* weights do not fit.*missing keys: styles\.1"):
        sd = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("encoder.styles.1.")}
        load_encoder(write("missing.pt", {**ckpt, "state_dict": sd}))
    with pytest.raises(CheckpointError, match="opts say a 1024-px generator"):
        load_encoder(write("size.pt", {**ckpt, "opts": {**ckpt["opts"], "output_size": 1024}}))
    with pytest.raises(CheckpointError, match="input channels"):
        load_encoder(write("seg.pt", {**ckpt, "opts": {**ckpt["opts"], "label_nc": 19}}))
    with pytest.raises(CheckpointError, match="different rows"):
        rows = ckpt["latent_avg"].clone()
        rows[3] += 1
        load_encoder(write("rows.pt", {**ckpt, "latent_avg": rows}))
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_encoder(write("other.pt", {"model": {"a": torch.zeros(1)}}))
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_encoder(tmp_path / "cut.pt")


def test_own_checkpoints_round_trip_and_version_1_files_still_load(tmp_path):
    seed = 31
    enc = build_encoder("mambastyle_tiny", 32, seed=seed, input_size=64, style_dim=64).eval()
    enc.set_latent_avg(torch.randn(64, generator=torch.Generator().manual_seed(seed)))
    save_encoder(enc, tmp_path / "v2.pt")
    loaded, meta = load_encoder(tmp_path / "v2.pt")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), enc(x))
    assert meta["version"] == 2 and "latent_avg" not in meta

    from mambastyle.models.encoders_v1 import build_v1_encoder

    config = {
        "arch": "mambastyle",
        "n_styles": 8,
        "style_dim": 64,
        "input_size": 64,
        "widths": [16, 32, 64, 128],
        "units": [1, 1, 2, 1],
        "fpn_dim": 64,
        "d_state": 8,
        "expand": 2.0,
        "head_pools": [[8, 4, 4], [8, 3, 3], [16, 2, 2]],
        "patch_pool": 6,
    }
    old = build_v1_encoder(config)
    randomize(old, torch.Generator().manual_seed(seed))
    avg = torch.randn(64, generator=torch.Generator().manual_seed(seed + 1))
    # version 1 stored latent_avg among the weights and named the VSS parts ss2d / ln_out
    sd = {
        (
            k.replace(".self_attention.", ".ss2d.").replace(".norm.", ".ln_out.")
            if k.startswith("vss.")
            else k
        ): v
        for k, v in old.state_dict().items()
    }
    sd["latent_avg"] = avg
    torch.save(
        {
            "format": "mambastyle-encoder",
            "version": 1,
            "config": config,
            "state_dict": sd,
            "generator": {"resolution": 32, "n_styles": 8},
            "step": 3,
        },
        tmp_path / "v1.pt",
    )
    back, meta = load_encoder(tmp_path / "v1.pt")
    old.set_latent_avg(avg)
    old.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), old(x))
    assert meta["step"] == 3


def test_official_file_from_s3(tmp_path, s3):
    import boto3

    from mambastyle.checkpoints import checkpoint_source
    from mambastyle.storage import StorageOptions

    endpoint, bucket = s3
    path, enc, g, avg = official_file(tmp_path / "m.pt", "mambastyle", 41)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="ckpt/m.pt", Body=path.read_bytes())
    uri = f"s3://{bucket}/ckpt/m.pt"
    loaded, meta = load_encoder(checkpoint_source(uri, StorageOptions(endpoint_url=endpoint)))
    x = images(41, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference_codes("mambastyle", enc, g, avg, x))
    assert meta["generator"]["source"] == uri


def test_registry_matches_the_published_sizes():
    with torch.device("meta"):
        counts = {
            n: sum(p.numel() for p in build_encoder(n, 1024).parameters())
            for n in ("psp", "e4e", "restyle_psp", "restyle_e4e", "mambastyle")
        }
    assert counts == {
        "psp": 267_136_704,
        "e4e": 267_136_704,
        "restyle_psp": 205_585_792,
        "restyle_e4e": 205_585_792,
        "mambastyle": 56_754_560,
    }
    frozen = [
        n
        for n, p in build_encoder("mambastyle_tiny", 64, input_size=64).named_parameters()
        if not p.requires_grad
    ]
    assert sorted(frozen) == sorted(
        f"SS2D_{i}.{n}" for i in (1, 2, 3) for n in ("skip_scale2", "self_attention.in_style_proj.weight")
    )
