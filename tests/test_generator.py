"""StyleGAN2 generator: shapes, determinism, gradients, modulation paths, feature injection."""

from __future__ import annotations

import pytest
import torch

from mambastyle.errors import InvalidConfig
from mambastyle.models.stylegan2 import (
    Generator,
    GeneratorConfig,
    ModulatedConv2d,
    build_generator,
)

SMALL = GeneratorConfig(resolution=32, style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=16)


def small(res: int = 32, seed: int = 0, **kw) -> Generator:
    cfg = GeneratorConfig(**{**SMALL.__dict__, "resolution": res, **kw})
    g = build_generator(cfg, seed=seed)
    g.compute_latent_avg(256)
    return g


@pytest.mark.parametrize("res", [8, 16, 32, 64, 128, 256, 512, 1024])
def test_shapes_for_every_supported_resolution(res):
    g = small(res, channel_max=8)
    n_styles = 2 * res.bit_length() - 4  # 2 * log2(res) - 2
    assert g.n_styles == n_styles
    w_plus = torch.randn(2, n_styles, SMALL.style_dim)
    with torch.no_grad():
        img = g.synthesis(w_plus, noise_mode="none")
    assert img.shape == (2, 3, res, res)
    assert torch.isfinite(img).all()


def test_standard_configurations_match_published_sizes():
    # rosinality FFHQ config-f (1024 px, channel multiplier 2): 18 styles; 30.0M parameters
    # in g_ema (mapping 4.2M); the 256-px config-e variant: 14 styles.
    cfg = GeneratorConfig(resolution=1024)
    assert cfg.n_styles == 18
    assert [cfg.channels(2**i) for i in range(2, 11)] == [512, 512, 512, 512, 512, 256, 128, 64, 32]
    with torch.device("meta"):
        g = Generator(cfg)
    n = sum(p.numel() for p in g.parameters())
    assert 30.0e6 < n < 30.5e6, n
    assert GeneratorConfig(resolution=256).n_styles == 14
    assert GeneratorConfig(resolution=512).n_styles == 16


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"resolution": 100}, "resolution"),
        ({"resolution": 2048}, "resolution"),
        ({"resolution": 4}, "resolution"),
        ({"n_mlp": 0}, "n_mlp"),
        ({"channel_max": 0}, "channel_max"),
        ({"blur_kernel": (0, 0)}, "blur_kernel"),
    ],
)
def test_invalid_config_names_the_field(kwargs, key):
    with pytest.raises(InvalidConfig) as exc:
        GeneratorConfig(**kwargs)
    assert exc.value.key == key


@pytest.mark.parametrize("mode", ["const", "none"])
def test_synthesis_is_deterministic_for_a_seed(mode):
    w_plus = torch.randn(3, 8, SMALL.style_dim)
    a = small(seed=7).synthesis(w_plus, noise_mode=mode)
    b = small(seed=7).synthesis(w_plus, noise_mode=mode)
    c = small(seed=8).synthesis(w_plus, noise_mode=mode)
    assert torch.equal(a, b)
    # bound: another seed's weights move outputs by ~6 (measured), 5 orders above allclose's 1e-5 + 1e-8
    assert not torch.allclose(a, c)


def test_random_noise_follows_its_generator():
    g = small()
    for m in g.modules():  # make noise visible in the output
        if hasattr(m, "noise") and hasattr(m.noise, "weight"):
            m.noise.weight.data.fill_(0.5)
    w_plus = torch.randn(2, g.n_styles, g.style_dim)
    a = g.synthesis(w_plus, noise_mode="random", generator=torch.Generator().manual_seed(1))
    b = g.synthesis(w_plus, noise_mode="random", generator=torch.Generator().manual_seed(1))
    c = g.synthesis(w_plus, noise_mode="random", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # bound: other noise at weight 0.5 moves outputs by ~10 (measured), far above allclose's 1e-5
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="noise mode"):
        g.synthesis(w_plus, noise_mode="bogus")


def test_every_parameter_receives_a_gradient():
    # Noise weights start at 0 and the const noise keeps their gradient non-zero.
    g = build_generator(SMALL, seed=0)
    z = torch.randn(2, SMALL.style_dim)
    img = g(z, noise_mode="const")
    (img * torch.randn_like(img)).sum().backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize(
    "kernel_size,upsample,demodulate",
    [
        (3, False, True),
        (3, True, True),
        (3, False, False),
        (3, True, False),
        (1, False, False),
        (1, False, True),
    ],
)
def test_modulated_conv_shared_weight_path_matches_grouped_reference(kernel_size, upsample, demodulate):
    conv = ModulatedConv2d(6, 5, kernel_size, 16, demodulate=demodulate, upsample=upsample)
    conv.modulation.bias.data.normal_()
    x = torch.randn(3, 6, 8, 8, requires_grad=True)
    s = torch.randn(3, 16, requires_grad=True)
    fast, ref = conv.forward_shared(x, s), conv.forward_grouped(x, s)
    assert fast.shape == ref.shape == (3, 5, 16 if upsample else 8, 16 if upsample else 8)
    # bound: the same sums in another float32 order: over 30 seeds forward <= 1.7e-6 (values <= 13; 6x under
    # atol 1e-5), gradients <= 1.3e-5 (values <= 42; 7x under atol 1e-4 before rtol)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (x, s, conv.weight), g)
    grads_ref = torch.autograd.grad(ref, (x, s, conv.weight), g)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_synthesis_is_independent_of_batch_composition():
    g = small()
    w_plus = torch.randn(4, g.n_styles, g.style_dim)
    whole = g.synthesis(w_plus)
    parts = torch.cat([g.synthesis(w_plus[:1]), g.synthesis(w_plus[1:])])
    # bound: batch size changes float32 kernel order only: <= 7e-6 on outputs up to 10, at most 35% of
    # atol + rtol * |x| over 60 seeds
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)


def test_zero_feature_offset_is_bit_exact_and_nonzero_changes_output():
    g = small()
    w_plus = torch.randn(2, g.n_styles, g.style_dim)
    base = g.synthesis(w_plus)
    for res in (4, 16, 32):
        zero = torch.zeros(1, g.config.channels(res), res, res)
        assert torch.equal(g.synthesis(w_plus, feature_offset=(res, zero)), base)
    delta = torch.randn(2, g.config.channels(16), 16, 16)
    # bound: an N(0, 1) offset moves outputs by ~4 (measured), far above allclose's 1e-5
    assert not torch.allclose(g.synthesis(w_plus, feature_offset=(16, delta)), base)
    with pytest.raises(ValueError, match="feature_offset"):
        g.synthesis(w_plus, feature_offset=(12, delta))


def test_w_plus_shape_is_checked():
    g = small()
    with pytest.raises(ValueError, match=r"\(B, 8, 64\)"):
        g.synthesis(torch.randn(2, 7, g.style_dim))


def test_truncation_and_latent_avg():
    g = build_generator(SMALL, seed=3)
    with pytest.raises(RuntimeError, match="latent_avg"):
        g.mapping(torch.randn(1, SMALL.style_dim), truncation_psi=0.5)
    a = g.compute_latent_avg(1000, seed=0).clone()
    b = g.compute_latent_avg(1000, seed=0).clone()
    assert torch.equal(a, b)
    # mean of the mapping network over a large sample, in float64
    z = torch.randn(1000, SMALL.style_dim, generator=torch.Generator().manual_seed(0))
    # bound: the same draws and float64 mean as compute_latent_avg: identical (measured); 1e-5 is slack
    # for float32 rounding of the mean (~1e-7). Truncation below is exact arithmetic (measured identical)
    torch.testing.assert_close(a, g.style(z).double().mean(0).float(), rtol=1e-5, atol=1e-5)
    z = torch.randn(4, SMALL.style_dim)
    w = g.mapping(z)
    torch.testing.assert_close(g.mapping(z, 0.0), a.expand(4, -1))
    torch.testing.assert_close(g.mapping(z, 0.5), a + 0.5 * (w - a))


def test_state_dict_excludes_latent_avg():
    g = small()
    assert "latent_avg" not in g.state_dict()
    assert "noises.noise_0" in g.state_dict()


def test_features_at_a_block_are_returned_with_the_same_image_and_depend_only_on_earlier_codes():
    g = small()
    w_plus = torch.randn(2, g.n_styles, g.style_dim)
    image, feats = g.synthesis(w_plus, return_features_at=16)
    assert torch.equal(image, g.synthesis(w_plus)) and feats.shape == (2, g.config.channels(16), 16, 16)
    # codes 0..4 drive the layers up to 16 px (conv1, then two convs per block); later codes do not
    later, earlier = w_plus.clone(), w_plus.clone()
    later[:, 5:] += 1.0
    earlier[:, 3] += 1.0
    assert torch.equal(g.synthesis(later, return_features_at=16)[1], feats)
    # bound: +1 on code 3 moves the features by ~1.2 (measured), far above allclose's 1e-5
    assert not torch.allclose(g.synthesis(earlier, return_features_at=16)[1], feats)
    # the features are the generator's own, whatever offset is added at that block
    offset = torch.randn(2, g.config.channels(16), 16, 16)
    shifted, same = g.synthesis(w_plus, feature_offset=(16, offset), return_features_at=16)
    assert torch.equal(same, feats) and not torch.allclose(shifted, image)
    with pytest.raises(ValueError, match="return_features_at"):
        g.synthesis(w_plus, return_features_at=24)
