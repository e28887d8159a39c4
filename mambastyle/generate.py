"""Building the configured generator and rendering samples from it (plain functions)."""

from __future__ import annotations

import math

import torch

from mambastyle.checkpoints import checkpoint_source, load_generator
from mambastyle.models.stylegan2 import Generator, GeneratorConfig, NoiseMode, build_generator
from mambastyle.visual import make_grid, to_uint8


def resolve_generator(
    checkpoint: str | None,
    architecture: GeneratorConfig,
    init_seed: int,
    latent_avg_samples: int,
    device: str | torch.device = "cpu",
    options=None,
) -> Generator:
    """Loads ``checkpoint`` (a local path or s3:// URI, checked against
    ``architecture.resolution``), or, when it is None, builds a random generator of
    ``architecture`` from ``init_seed``.

    ``options`` are the storage module's ``StorageOptions`` (S3 endpoint, region, profile).
    Either way the result is in eval mode, frozen, and has ``latent_avg`` set.
    """
    if checkpoint is not None:
        return load_generator(
            checkpoint_source(checkpoint, options),
            resolution=architecture.resolution,
            latent_avg_samples=latent_avg_samples,
            device=device,
        )
    g = build_generator(architecture, seed=init_seed).to(device).eval().requires_grad_(False)
    g.compute_latent_avg(latent_avg_samples)
    g.latent_avg_source = f"computed({latent_avg_samples})"
    return g


@torch.no_grad()
def render_samples(
    g: Generator,
    seed: int,
    num: int,
    truncation: float = 1.0,
    noise_mode: NoiseMode = "const",
    batch_size: int = 8,
) -> torch.Tensor:
    """Renders ``num`` images from z drawn with ``seed``: (num, 3, R, R) on the CPU.

    The result depends only on (weights, seed, num, truncation, noise_mode), not on
    ``batch_size`` or the device's RNG state.
    """
    device = g.latent_avg.device
    z = torch.randn(num, g.style_dim, generator=torch.Generator().manual_seed(seed))
    # Per-sample noise is drawn up front so that batching does not change it.
    noise = g.make_noise(num, noise_mode, torch.Generator().manual_seed(seed + 1))
    out = []
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        w = g.mapping(z[start:stop].to(device), truncation)
        w_plus = w[:, None, :].expand(-1, g.n_styles, -1)  # (b, S, D)
        batch_noise = [n if n is None or n.shape[0] == 1 else n[start:stop] for n in noise]
        out.append(g.synthesis(w_plus, noise=batch_noise).cpu())
    return torch.cat(out)


def sample_grid(images: torch.Tensor):
    """A near-square grid (H', W', 3) uint8 of (B, 3, H, W) images in [-1, 1]."""
    return make_grid(to_uint8(images), ncols=math.ceil(math.sqrt(images.shape[0])))
