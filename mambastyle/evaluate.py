"""Evaluating an encoder: reconstruction quality on real faces, latent recovery on generator
samples, size and speed. Plain PyTorch (no Ray); the DVC stage ``evaluate`` calls it.

Reconstructions are compared with the inputs at the encoder's input size, as in the invert stage:
MSE and SSIM always, LPIPS (AlexNet) and identity similarity (cosine of ArcFace IR-SE50
embeddings, faces cropped as in training) only when their weights are given: a metric whose
weights are missing is reported as not measured, never estimated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from mambastyle.invert.core import prepare_images, ssim
from mambastyle.models.fuser import fused_synthesis


@torch.no_grad()
def reconstruction_metrics(
    encoder, generator, images: Iterable[torch.Tensor], batch_size: int, lpips_net=None, identity=None,
    fuser=None,
) -> tuple[dict, list[torch.Tensor]]:  # fmt: skip
    """Per-image MSE, SSIM (and LPIPS, identity cosine) of uint8 (3, H, W) ``images``.

    With a ``fuser`` (trained with ``encoder``), every metric is measured again for the
    reconstruction with its feature correction (zero edit direction), as ``{metric}_fuser``.

    Returns (the per-image values as lists, keyed by metric; the inputs and reconstructions as
    (2, 3, S, S) pairs in [-1, 1] (triples with the fuser's), for pictures).
    """
    size = encoder.config.input_size
    device = encoder.latent_avg.device
    names = ["mse", "ssim"] + (["lpips"] if lpips_net is not None else [])
    names += ["id_similarity"] if identity is not None else []
    values: dict[str, list[float]] = {n + suffix: [] for suffix in ("", "_fuser")[: 1 + (fuser is not None)]
                                      for n in names}  # fmt: skip
    pairs: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def measure(y: torch.Tensor, x: torch.Tensor, suffix: str) -> torch.Tensor:
        if y.shape[-1] != size:
            y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        values["mse" + suffix] += (y - x).pow(2).flatten(1).mean(1).tolist()
        values["ssim" + suffix] += ssim(y.clamp(-1, 1), x).tolist()
        if lpips_net is not None:
            values["lpips" + suffix] += lpips_net(y, x).flatten().tolist()
        if identity is not None:
            e_y = F.normalize(identity.embed(y.clamp(-1, 1)), dim=1)  # the picture, as in ssim
            e_x = F.normalize(identity.embed(x), dim=1)
            values["id_similarity" + suffix] += (e_y * e_x).sum(1).tolist()
        return y.clamp(-1, 1)

    def flush() -> None:
        x = prepare_images(torch.stack(batch), size).to(device)
        if fuser is None:
            shown = [x, measure(generator.synthesis(encoder(x), noise_mode="const"), x, "")]
        else:
            w, features = encoder(x, return_features=True)
            fused = fused_synthesis(generator, fuser, w, features)
            shown = [
                x,
                measure(generator.synthesis(w, noise_mode="const"), x, ""),
                measure(fused, x, "_fuser"),
            ]
        pairs.extend(torch.stack(shown, 1).cpu())
        batch.clear()

    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return values, pairs


@torch.no_grad()
def latent_recovery(encoder, generator, samples: int, seed: int, truncation: float, batch_size: int) -> dict:
    """Encodes ``samples`` generator images of known codes (z drawn from ``seed``, truncated, one w
    per image) and compares the recovered codes, in W+ and in the generator's style space, as MSE
    and relative to always answering ``latent_avg`` (``*_rel``: 1 = no better, 0 = exact)."""
    device = encoder.latent_avg.device
    z = torch.randn(samples, generator.style_dim, generator=torch.Generator().manual_seed(seed))
    w_true, w_hat = [], []
    for i in range(0, samples, batch_size):
        w = generator.mapping(z[i : i + batch_size].to(device), truncation)
        w = w[:, None].expand(-1, generator.n_styles, -1)
        x = prepare_images(((generator.synthesis(w, noise_mode="const") + 1) * 127.5).clamp(0, 255).round(),
                           encoder.config.input_size)  # fmt: skip
        w_true.append(w)
        w_hat.append(encoder(x.to(device)))
    w, w_hat = torch.cat(w_true), torch.cat(w_hat)
    avg = encoder.latent_avg.expand_as(w)
    styles = generator.style_codes
    s_true = styles(w)
    latent_mse, style_mse = F.mse_loss(w_hat, w), F.mse_loss(styles(w_hat), s_true)
    return {
        "latent_mse": float(latent_mse),
        "latent_rel": float(latent_mse / F.mse_loss(avg, w)),
        "style_mse": float(style_mse),
        "style_rel": float(style_mse / F.mse_loss(styles(avg), s_true)),
        "samples": samples,
    }


@torch.no_grad()
def latency(encoder, batch_size: int, repeats: int) -> dict:
    """Encoder forward time per image (ms) on random inputs, after one warm-up batch: the median
    over ``repeats`` batches, on the encoder's device with the current torch threads."""
    device = encoder.latent_avg.device
    size = encoder.config.input_size
    x = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    encoder(x)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        encoder(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / batch_size * 1000)
    return {"ms_per_image": float(np.median(times)), "batch_size": batch_size, "device": device.type,
            "threads": torch.get_num_threads()}  # fmt: skip
