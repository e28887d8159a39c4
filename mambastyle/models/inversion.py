"""Bulk inversion core: a batch of aligned images -> W+ codes and reconstruction metrics.

Plain PyTorch, no Ray: the Ray Data stage calls :func:`invert_batch` once per batch inside
an actor that holds the encoder and generator. Images are resized to the encoder's input
size (antialiased bilinear, as in training); reconstructions are compared at that size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.models.encoders import Encoder
from mambastyle.models.fuser import fused_synthesis
from mambastyle.models.stylegan2 import Generator

PRECISIONS = ("fp32", "bf16")


def inference_precision(device: str | torch.device, precision: str):
    """The context the models' forward passes run in: ``fp32`` as they are, or ``bf16``
    autocast on ``device`` (convolutions and matrix products in bfloat16, which AMX /
    AVX-512-BF16 CPUs and recent GPUs run natively; reductions and the rest in float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def precision_tag(precision: str) -> dict[str, str]:
    """What a run's id and metadata record of its precision: nothing for fp32 (the default), so
    fp32 runs keep the ids they had before precision was a setting."""
    return {} if precision == "fp32" else {"precision": precision}


def bf16_native(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (else autocast emulates it, slowly)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def warn_if_emulated(setting: str, precision: str, device: str | torch.device) -> None:
    """Logs a warning when ``setting`` asks for bf16 on a device that only emulates it."""
    if precision == "bf16" and not bf16_native(device):
        logging.getLogger(__name__).warning(
            "%s bf16 on %s, which has no bfloat16 instructions: emulated, slower than fp32", setting, device
        )


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    "valid" windows), averaged over channels and positions: (B, C, H, W) pairs -> (B,)."""
    c = x.shape[1]
    g = _gaussian_window().to(x)
    win = min(11, x.shape[-1], x.shape[-2])
    if win < 11:  # tiny images: the largest window that fits
        g = _gaussian_window(win, 1.5 * win / 11).to(x)
    kh = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


@dataclass
class Inversion:
    """One batch's results, as NumPy arrays (``None`` where not measured)."""

    w_plus: np.ndarray  # (B, n_styles, style_dim) float32
    mse: np.ndarray | None
    ssim: np.ndarray | None
    lpips: np.ndarray | None
    mse_fuser: np.ndarray | None = None  # the same metrics with the fuser's feature correction
    ssim_fuser: np.ndarray | None = None
    lpips_fuser: np.ndarray | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(Inversion))


def _metrics(y: torch.Tensor, x: torch.Tensor, lpips_net: nn.Module | None):
    """Per-image MSE, SSIM and LPIPS (None without ``lpips_net``) of reconstructions ``y`` of ``x``."""
    if y.shape[-1] != x.shape[-1]:
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    mse = (y - x).pow(2).flatten(1).mean(1).cpu().numpy()
    ss = ssim(y.clamp(-1, 1), x).cpu().numpy()
    lp = lpips_net(y, x).flatten().cpu().numpy() if lpips_net is not None else None
    return mse, ss, lp


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) (or (B, H, W, 3)) -> float (B, 3, size, size) in [-1, 1]."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    x = images.float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def invert_batch(
    encoder: Encoder,
    images: torch.Tensor,
    generator: Generator | None = None,
    lpips_net: nn.Module | None = None,
    pad_to: int | None = None,
    fuser: nn.Module | None = None,
    precision: str = "fp32",
) -> Inversion:
    """Encodes ``images`` (uint8) to W+; with ``generator`` also renders the reconstructions and
    measures MSE and SSIM (and LPIPS with ``lpips_net``) against the resized inputs. With a
    ``fuser`` (trained with this encoder), the same metrics are measured again for the
    reconstruction with its feature correction (zero edit direction): ``*_fuser``.

    ``precision``: ``bf16`` runs the encoder and generator under bfloat16 autocast (see
    :func:`inference_precision`); codes and metrics come back in float32.

    ``pad_to``: run the models on batches of exactly this many images (the last padded with
    zeros). CPU kernels are chosen by batch size, so an image's code can differ in its last
    bits with the size of the batch it lands in; with a fixed size it is the same whichever
    images share its batch, and a re-run reproduces the table bit for bit.
    """
    n = images.shape[0]
    if pad_to is not None and n > pad_to:
        parts = [invert_batch(encoder, images[i : i + pad_to], generator, lpips_net, pad_to, fuser, precision)
                 for i in range(0, n, pad_to)]  # fmt: skip
        return _concat(parts)
    if pad_to is not None and n < pad_to:
        filler = images.new_zeros((pad_to - n, *images.shape[1:]))
        out = invert_batch(encoder, torch.cat([images, filler]), generator, lpips_net, fuser=fuser,
                           precision=precision)  # fmt: skip
        return Inversion(*(None if getattr(out, f) is None else getattr(out, f)[:n] for f in FIELDS))
    device = encoder.latent_avg.device
    x = prepare_images(images, encoder.config.input_size).to(device)
    y = y_fused = None
    with inference_precision(device, precision):
        if fuser is None:
            w, features = encoder(x), None
        else:
            w, features = encoder(x, return_features=True)
        if generator is not None:
            y = generator.synthesis(w, noise_mode="const").float()
            if fuser is not None:
                y_fused = fused_synthesis(generator, fuser, w, features).float()
    out = Inversion(w.float().cpu().numpy(), None, None, None)
    if y is not None:  # metrics in float32
        out.mse, out.ssim, out.lpips = _metrics(y, x, lpips_net)
        if y_fused is not None:
            out.mse_fuser, out.ssim_fuser, out.lpips_fuser = _metrics(y_fused, x, lpips_net)
    return out


def _concat(parts: list[Inversion]) -> Inversion:
    def cat(values):
        return None if values[0] is None else np.concatenate(values)

    return Inversion(*(cat([getattr(p, f) for p in parts]) for f in FIELDS))
