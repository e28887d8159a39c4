"""Native upfirdn2d / bias-act ops against their literal definitions on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambastyle.layers import (
    fused_leaky_relu,
    leaky_relu_ref,
    make_kernel,
    upfirdn2d,
    upfirdn2d_ref,
)

CASES = [
    # (up, down, pad, kernel shape)
    (1, 1, 0, (3, 3)),
    (1, 1, (2, 1), (4, 4)),
    (2, 1, (2, 1), (4, 4)),  # StyleGAN2 ToRGB upsample
    (1, 1, (2, 2), (4, 4)),  # StyleGAN2 blur after transposed conv (3x3)
    (1, 2, (1, 1), (4, 4)),  # downsample
    (2, 2, (1, 2, 0, 3), (3, 5)),
    (4, 1, (3, 2), (8, 8)),
    ((2, 1), (1, 2), (-1, 3, 2, 0), (4, 3)),  # anisotropic factors, cropping pad
    (2, 1, (-2, -1), (2, 2)),  # negative pads (crop) on both sides
    (3, 2, (0, 4, 5, 0), (1, 6)),
]


@pytest.mark.parametrize("up,down,pad,kshape", CASES)
def test_upfirdn2d_matches_definition(up, down, pad, kshape):
    x = torch.randn(2, 3, 7, 9)
    k = torch.randn(*kshape)
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    want = upfirdn2d_ref(x.numpy(), k.numpy(), up=up, down=down, pad=pad)
    assert got.shape == want.shape
    # bound: float32 sums of <= 64 taps vs a float64 oracle: measured <= 2.1e-6 on values up to 18, at
    # most 9% of atol + rtol * |want| over 40 seeds
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "up,down,pad", [(1, 1, (2, 2)), (1, 2, (1, 1)), (1, (1, 2), (0, 3, 2, -1)), (2, 1, (2, 1))]
)
@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 2, 1], [0.5, -1.0, 2.0, 0.25, 1.0]])
def test_upfirdn2d_separable_kernels_match_definition(up, down, pad, taps):
    # Separable kernels take the CPU's two-pass route: check it against the literal definition.
    x = torch.randn(2, 3, 8, 7)
    k = make_kernel(taps) if sum(taps) else torch.tensor(taps)[:, None] * torch.tensor(taps)[None, :]
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    want = upfirdn2d_ref(x.numpy(), k.numpy(), up=up, down=down, pad=pad)
    # bound: two float32 passes of <= 5 taps vs float64: measured <= 4e-7, at most 13% of the tolerance
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 1, (2, 2)), (1, 2, (1, 1))])
def test_upfirdn2d_gradients_match_finite_differences(up, down, pad):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    k = make_kernel([1, 3, 3, 1]).double()
    assert torch.autograd.gradcheck(lambda t: upfirdn2d(t, k, up=up, down=down, pad=pad), (x,))


def test_upfirdn2d_rejects_bad_arguments():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="expects"):
        upfirdn2d(x[0], torch.ones(2, 2))
    with pytest.raises(ValueError, match="empty"):
        upfirdn2d(x, torch.ones(9, 9))
    with pytest.raises(ValueError, match=">= 1"):
        upfirdn2d(x, torch.ones(2, 2), up=0)


def test_make_kernel_is_normalised_outer_product():
    k = make_kernel([1, 3, 3, 1])
    assert k.shape == (4, 4)
    # bound: dyadic fractions (n / 64) are exact in float32: identical (measured); default tolerance is slack
    assert torch.isclose(k.sum(), torch.tensor(1.0))
    assert torch.allclose(k, torch.outer(torch.tensor([1, 3, 3, 1.0]), torch.tensor([1, 3, 3, 1.0])) / 64)


@pytest.mark.parametrize("ndim", [2, 4])
def test_fused_leaky_relu_matches_reference_forward_and_backward(ndim):
    shape = (3, 5) if ndim == 2 else (2, 5, 4, 3)
    x = torch.randn(*shape, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    got = fused_leaky_relu(x, b)
    want = leaky_relu_ref(x, b)
    # bound: the same element-wise arithmetic: identical (measured), default float32 tolerance is slack
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    gx, gb = torch.autograd.grad(got, (x, b), g)
    rx, rb = torch.autograd.grad(want, (x, b), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)
    # the gain keeps the second moment of a standard normal input
    big = fused_leaky_relu(torch.randn(200_000))
    # bound: E[out^2] = 2 * (0.5 + 0.2^2 * 0.5) = 1.04 and Var[out^2] = 4.93, so the mean of 2e5 draws has
    # sd 0.005 (measured 0.0049 over 300 seeds): 0.02 is 4 sd, failing ~1 run in 16000
    assert abs(big.pow(2).mean().item() - (1 + 0.2**2)) < 0.02


def test_fused_leaky_relu_checks_bias_shape():
    with pytest.raises(ValueError, match="bias"):
        fused_leaky_relu(torch.randn(2, 4, 3, 3), torch.zeros(5))
