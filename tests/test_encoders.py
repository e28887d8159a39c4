"""Encoder registry: shapes, parameter counts, gradients, latent_avg offset."""

from __future__ import annotations

import pytest
import torch

from mambastyle.errors import InvalidConfig
from mambastyle.models.encoders import (
    ENCODERS,
    build_encoder,
    encoder_config,
    n_styles_for,
    style_split,
)

TINY = ["mambastyle_tiny", "psp_tiny", "e4e_tiny"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_published_sizes():
    with torch.device("meta"):
        mamba = build_encoder("mambastyle", 1024)
        psp = build_encoder("psp", 1024)
    assert mamba.n_styles == psp.n_styles == 18
    assert n_params(mamba) == 56_754_560  # the official Backbone_Mamba_ffhq
    assert n_params(psp) == 267_136_704  # pSp's GradualStyleEncoder(50, 'ir_se')
    # bound: follows from the exact counts above (ratio 0.212): under a quarter of pSp's size
    assert n_params(mamba) <= 0.25 * n_params(psp)


def test_style_split_and_counts():
    assert [n_styles_for(r) for r in (1024, 512, 256, 64, 8)] == [18, 16, 14, 10, 4]
    assert style_split(18) == (4, 5, 9)
    assert style_split(14) == (4, 5, 5)
    assert style_split(8) == (4, 4, 0)
    assert style_split(3) == (3, 0, 0)
    assert all(sum(style_split(n)) == n for n in range(1, 30))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 128, 256, 512, 1024])
def test_output_shapes_for_every_resolution(name, resolution):
    enc = build_encoder(name, resolution, seed=0, input_size=64).eval()
    with torch.no_grad():
        w = enc(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert w.shape == (2, n_styles_for(resolution), 512)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("name", TINY)
def test_features_for_feature_space_refinement(name):
    enc = build_encoder(name, 64, seed=0, input_size=64)
    w, feats = enc(torch.randn(1, 3, 64, 64), return_features=True)
    assert w.shape == (1, 10, 512)
    assert feats.shape == (1, enc.config.fpn_dim, 16, 16)


def _grad_coverage(enc, size, features=True):
    enc.train()
    w, feats = enc(torch.randn(2, 3, size, size), return_features=True)
    loss = (w * torch.randn_like(w)).sum()
    if features:
        loss = loss + (feats * torch.randn_like(feats)).sum()
    else:
        enc.feature_adapter.requires_grad_(False)  # as W+ training does
    loss.backward()
    return [n for n, p in enc.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]  # fmt: skip


TRAINABLE = [n for n in ENCODERS if n.endswith(("_tiny", "_small")) and "restyle" not in n]


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_parameter_receives_a_gradient(name):
    assert not _grad_coverage(build_encoder(name, 256, seed=1, input_size=64), 64)


@pytest.mark.parametrize("resolution", [32, 256])
def test_w_plus_training_leaves_no_trainable_parameter_without_a_gradient(resolution):
    # DDP fails on a trainable parameter that gets no gradient: with 8 styles (32 px) the
    # fine level has no codes, and W+ training never uses the feature adapter.
    enc = build_encoder("mambastyle_tiny", resolution, seed=1, input_size=32)
    assert not _grad_coverage(enc, 32, features=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mambastyle", "psp"])
def test_every_parameter_of_full_size_encoders_receives_a_gradient(name):
    # Full width, smaller input to keep it to seconds; the architecture is the same.
    assert not _grad_coverage(build_encoder(name, 1024, seed=1, input_size=64), 64)


@pytest.mark.parametrize("name", TINY)
def test_codes_are_offsets_from_latent_avg(name):
    enc = build_encoder(name, 32, seed=0, input_size=64).eval()
    avg = torch.randn(512)
    enc.set_latent_avg(avg)
    for p in enc.parameters():  # a zero network predicts zero offsets
        p.data.zero_()
    with torch.no_grad():
        w = enc(torch.randn(3, 3, 64, 64))
    # bound: zero weights give offsets of exactly 0, so w is avg bit for bit; the default tolerance is ample
    torch.testing.assert_close(w, avg.expand(3, enc.n_styles, 512))


def test_seeded_builds_are_identical():
    a = build_encoder("mambastyle_tiny", 64, seed=3, input_size=64).eval()
    b = build_encoder("mambastyle_tiny", 64, seed=3, input_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_errors():
    enc = build_encoder("mambastyle_tiny", 64, input_size=64)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        enc(torch.randn(1, 3, 32, 32))
    with pytest.raises(KeyError, match="unknown encoder 'nope'"):
        build_encoder("nope")
    with pytest.raises(InvalidConfig, match="input_size"):
        encoder_config("mambastyle_tiny", 64, input_size=100)
    with pytest.raises(InvalidConfig, match="bogus"):
        encoder_config("mambastyle_tiny", 64, bogus=1)
    with pytest.raises(InvalidConfig, match="resolution"):
        n_styles_for(100)


def test_subsample_shortcut_equals_one_by_one_max_pool():
    from mambastyle.models.encoders import Subsample

    x = torch.randn(2, 3, 9, 8)
    for stride in (1, 2, 3):
        assert torch.equal(Subsample(stride)(x), torch.nn.MaxPool2d(1, stride)(x))


@pytest.mark.parametrize("name", TINY)
def test_channels_last_placement_computes_the_same_codes(monkeypatch, name):
    from mambastyle.models import encoders

    enc = build_encoder(name, 256, seed=0, input_size=64).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(encoders, "fast_layout", lambda t: t)  # every activation NCHW, as built
        want, want_feats = enc(x, return_features=True)
    placed = encoders.on_device(enc, "cpu")
    convs = [mod for mod in placed.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():
        got, feats = placed(x, return_features=True)
    # bound: the same float32 arithmetic summed in another order; measured <= 2e-6 relative
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(feats, want_feats, rtol=1e-5, atol=1e-5 * want_feats.abs().max().item())


@pytest.mark.parametrize(
    "shape,pool",
    [
        ((2, 512, 64, 64), (64, 9, 9)),  # MambaStyle's first head: overlapping spatial windows
        ((3, 24, 7, 11), (5, 3, 4)),  # every window size uneven, channels too
        ((1, 8, 5, 5), (8, 5, 5)),  # identity
        ((2, 6, 4, 9), 2),  # one size for all three dimensions
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_space_pool_is_the_3d_adaptive_pool(shape, pool, channels_last):
    from mambastyle.models.encoders import ChannelSpacePool

    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.nn.AdaptiveAvgPool3d(pool)(x.unsqueeze(1))
    got = ChannelSpacePool(pool)(x.unsqueeze(1))
    assert got.shape == want.shape
    # bound: the same means summed in another order, in float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # other shapes (two input planes here) take the 3-D pool itself
    two = torch.stack([x, 2 * x], dim=1)
    assert torch.equal(ChannelSpacePool(pool)(two), torch.nn.AdaptiveAvgPool3d(pool)(two))
