"""The bulk inversion core (no Ray): codes, reconstruction metrics, batch independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from mambastyle.generate import resolve_generator
from mambastyle.models.encoders import build_encoder
from mambastyle.models.inversion import invert_batch, prepare_images, ssim
from mambastyle.models.stylegan2 import GeneratorConfig


@pytest.mark.parametrize("size", [32, 64])
def test_ssim_matches_scikit_image(size):
    x = torch.rand(3, 3, size, size) * 2 - 1
    y = (0.6 * x + 0.3 * (torch.rand_like(x) * 2 - 1)).clamp(-1, 1)
    got = ssim(x, y)
    for i in range(3):
        want = structural_similarity(x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(),
                                     channel_axis=2, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)  # fmt: skip
        # bound: the same formula, float32 vs float64: measured <= 1.2e-7 over 40 seeds (abs 1e-5 is 80x);
        # ssim(x, x) is exactly 1 (measured), within allclose's default 1e-5
        assert float(got[i]) == pytest.approx(want, abs=1e-5)
    assert torch.allclose(ssim(x, x), torch.ones(3))


@pytest.fixture(scope="module")
def models():
    cfg = GeneratorConfig(resolution=32, style_dim=32, n_mlp=2, channel_max=32)
    g = resolve_generator(None, cfg, 0, 500)
    enc = build_encoder("mambastyle_tiny", 32, seed=0, input_size=32, style_dim=32).eval()
    enc.set_latent_avg(g.latent_avg)
    return enc, g


def test_invert_batch_codes_and_metrics(models):
    enc, g = models
    images = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)  # resized to the input size
    out = invert_batch(enc, images, g)
    assert out.w_plus.shape == (5, g.n_styles, 32) and out.w_plus.dtype == np.float32
    x = prepare_images(images, 32)
    with torch.no_grad():
        w = enc(x)
        y = g.synthesis(w)
    # bound: the same computation on the same batch: identical (measured 0); 1e-6 / 1e-5 are slack
    np.testing.assert_allclose(out.w_plus, w.numpy(), atol=1e-6)
    np.testing.assert_allclose(out.mse, ((y - x) ** 2).flatten(1).mean(1).numpy(), rtol=1e-5)
    assert out.ssim.shape == (5,) and out.lpips is None
    # channels-last input (as Ray Data decodes PNGs) gives the same codes
    np.testing.assert_array_equal(invert_batch(enc, images.permute(0, 2, 3, 1)).w_plus, out.w_plus)
    assert invert_batch(enc, images).mse is None  # no generator: codes only


def test_results_do_not_depend_on_batching(models):
    enc, g = models
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    whole = invert_batch(enc, images, g)
    parts = [invert_batch(enc, images[i : i + 3], g) for i in range(0, 7, 3)]  # last batch of 1
    # bound: batch size changes float32 kernel rounding only: measured codes <= 2.4e-7 apart (|w| < 2; atol
    # 1e-5 is 40x), mse <= 3e-7 relative (rtol 1e-4 is 300x)
    np.testing.assert_allclose(np.concatenate([p.w_plus for p in parts]), whole.w_plus, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([p.mse for p in parts]), whole.mse, rtol=1e-4, atol=1e-6)


def test_padded_batches_give_codes_independent_of_batch_companions(models):
    enc, g = models
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8)
    ref = invert_batch(enc, images, g, pad_to=4)  # batches of 4, 4 and 3 (+1 padding)
    assert ref.w_plus.shape == (11, g.n_styles, 32) and ref.mse.shape == ref.ssim.shape == (11,)
    # the same image in other batches, with other companions and a partial batch: same bits
    order = torch.randperm(11)
    shuffled = invert_batch(enc, images[order], g, pad_to=4)
    np.testing.assert_array_equal(shuffled.w_plus, ref.w_plus[order.numpy()])
    np.testing.assert_array_equal(shuffled.mse, ref.mse[order.numpy()])
    for i in (0, 5, 10):
        np.testing.assert_array_equal(
            invert_batch(enc, images[i : i + 1], g, pad_to=4).w_plus[0], ref.w_plus[i]
        )


def test_bf16_inference_stays_near_fp32_and_returns_float32(models, rng):
    from mambastyle.edit.core import render
    from mambastyle.models.inversion import inference_precision

    enc, g = models
    images = torch.from_numpy(rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    fp32 = invert_batch(enc, images, g, pad_to=4)
    bf16 = invert_batch(enc, images, g, pad_to=4, precision="bf16")
    assert bf16.w_plus.dtype == np.float32 and bf16.mse.dtype == np.float32
    assert not np.array_equal(bf16.w_plus, fp32.w_plus)  # bf16 did run
    # bound: bfloat16 keeps 8 significant bits (relative rounding 2^-9 per product, averaged
    # over long sums); measured 0.4-0.7% of the codes' distance from the average, 2% is 3x that
    avg = g.latent_avg.numpy()
    rel = np.linalg.norm(bf16.w_plus - fp32.w_plus) / np.linalg.norm(fp32.w_plus - avg)
    assert rel < 0.02, rel
    np.testing.assert_allclose(bf16.mse, fp32.mse, rtol=0.05)  # measured <= 1.3%
    # rendering: measured 0.45 grey levels on average, 5 at most, of 255
    with inference_precision("cpu", "bf16"):
        edited = render(g, fp32.w_plus, 4)
    diff = np.abs(edited.astype(int) - render(g, fp32.w_plus, 4).astype(int))
    assert diff.mean() < 2 and diff.max() < 32
    with pytest.raises(ValueError, match="precision"):
        inference_precision("cpu", "fp16")
