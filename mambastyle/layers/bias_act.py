"""Bias + leaky ReLU + gain, StyleGAN2's ``fused_leaky_relu``, in native PyTorch.

StyleGAN2 applies ``leaky_relu(x + bias, 0.2) * sqrt(2)`` after every modulated
convolution and mapping layer; the gain keeps the activations' second moment.
PyTorch fuses the add and the activation well enough on CPU and GPU, so there is
no compiled kernel to build or load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_SLOPE = 0.2
DEFAULT_GAIN = math.sqrt(2.0)


def fused_leaky_relu(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    negative_slope: float = DEFAULT_SLOPE,
    scale: float = DEFAULT_GAIN,
) -> torch.Tensor:
    """Returns ``leaky_relu(x + bias, negative_slope) * scale``.

    Args:
        x: (B, C, ...) input; ``bias`` broadcasts over dimension 1.
        bias: (C,) bias or None.
    """
    if bias is not None:
        if bias.ndim != 1 or x.ndim < 2 or bias.shape[0] != x.shape[1]:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not match channels of x {tuple(x.shape)}"
            )
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale


def leaky_relu_ref(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    negative_slope: float = DEFAULT_SLOPE,
    scale: float = DEFAULT_GAIN,
) -> torch.Tensor:
    """Element-wise definition of :func:`fused_leaky_relu` (the test oracle)."""
    if bias is not None:
        shape = [1, -1] + [1] * (x.ndim - 2)
        x = x + bias.reshape(shape)
    return torch.where(x >= 0, x, x * negative_slope) * scale
