"""Evaluating encoders: reconstruction quality on real faces, latent recovery on generator
samples, size, speed and editability. Plain PyTorch (no Ray); the DVC stage ``evaluate`` calls it.

Reconstructions are compared with the inputs at the encoder's input size, as in the invert stage
(several encoders side by side: at the smallest of their input sizes): MSE and SSIM always,
LPIPS (AlexNet) and identity similarity (cosine of ArcFace IR-SE50 embeddings, faces cropped as
in training) only when their weights are given: a metric whose weights are missing is reported
as not measured, never estimated. ``identity_dlib`` is dlib's face-recognition descriptor
(:mod:`mambastyle.identity`), reported under its own name.

``precision`` (``fp32`` | ``bf16``) is how the encoders, fusers and the generator run, as in the
invert stage (:func:`mambastyle.models.inversion.inference_precision`); their outputs, and every
metric network and metric, are float32. The pictures that latent recovery encodes are rendered
in float32 either way: they are the ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from mambastyle.models.fuser import fused_synthesis
from mambastyle.models.inversion import inference_precision, prepare_images, ssim


def _run(precision: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the models in ``precision`` on the device of its first
    tensor argument; tensor results (alone or in a tuple) come back as float32."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with inference_precision(device, precision):
        out = fn(*args, **kwargs)
    if isinstance(out, tuple):
        return tuple(t.float() if isinstance(t, torch.Tensor) else t for t in out)
    return out.float()


def _batches(images: Iterable[torch.Tensor], batch_size: int):
    """Stacks of up to ``batch_size`` uint8 (3, H, W) images, in order."""
    batch: list[torch.Tensor] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def reconstruction_metrics(
    encoder, generator, images: Iterable[torch.Tensor], batch_size: int, lpips_net=None, identity=None,
    fuser=None, precision: str = "fp32",
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

    def flush(batch: torch.Tensor) -> None:
        x = prepare_images(batch, size).to(device)
        if fuser is None:
            w = _run(precision, encoder, x)
            shown = [x, measure(_run(precision, generator.synthesis, w, noise_mode="const"), x, "")]
        else:
            w, features = _run(precision, encoder, x, return_features=True)
            fused = _run(precision, fused_synthesis, generator, fuser, w, features)
            shown = [
                x,
                measure(_run(precision, generator.synthesis, w, noise_mode="const"), x, ""),
                measure(fused, x, "_fuser"),
            ]
        pairs.extend(torch.stack(shown, 1).cpu())

    for batch in _batches(images, batch_size):
        flush(batch)
    return values, pairs


@torch.no_grad()
def latent_recovery(
    encoder, generator, samples: int, seed: int, truncation: float, batch_size: int, precision: str = "fp32"
) -> dict:
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
        w_hat.append(_run(precision, encoder, x.to(device)))
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
def latency(encoder, batch_size: int, repeats: int, precision: str = "fp32") -> dict:
    """Encoder forward time per image (ms) on random inputs, after one warm-up batch: the median
    over ``repeats`` batches, on the encoder's device with the current torch threads, in
    ``precision``."""
    device = encoder.latent_avg.device
    size = encoder.config.input_size
    x = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    _run(precision, encoder, x)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _run(precision, encoder, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / batch_size * 1000)
    return {"ms_per_image": float(np.median(times)), "batch_size": batch_size, "device": device.type,
            "threads": torch.get_num_threads(), "precision": precision}  # fmt: skip


@torch.no_grad()
def compare_encoders(
    encoders: Mapping[str, torch.nn.Module],
    generator,
    images: Iterable[torch.Tensor],
    batch_size: int,
    lpips_net=None,
    identity=None,
    dlib_identity=None,
    precision: str = "fp32",
) -> tuple[dict[str, dict[str, list[float]]], list[torch.Tensor]]:
    """Reconstructs the same uint8 (3, H, W) ``images`` with every encoder and measures each
    reconstruction against its input at the smallest of the encoders' input sizes.

    Returns (per encoder, its per-image values keyed by metric: mse, ssim, and lpips,
    id_similarity (ArcFace), identity_dlib where their networks are given; (1 + n_encoders,
    3, S, S) stacks of the input and each reconstruction, in [-1, 1], for pictures).
    """
    size = min(e.config.input_size for e in encoders.values())
    names = ["mse", "ssim"] + (["lpips"] if lpips_net is not None else [])
    names += ["id_similarity"] if identity is not None else []
    names += ["identity_dlib"] if dlib_identity is not None else []
    values = {name: {n: [] for n in names} for name in encoders}
    shown: list[torch.Tensor] = []

    def flush(batch: torch.Tensor) -> None:
        x = prepare_images(batch, size)
        row = [x]
        for name, encoder in encoders.items():
            device = encoder.latent_avg.device
            w = _run(precision, encoder, prepare_images(batch, encoder.config.input_size).to(device))
            w = w.to(generator.latent_avg.device)
            y = _run(precision, generator.synthesis, w, noise_mode="const").cpu()
            y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            v = values[name]
            v["mse"] += (y - x).pow(2).flatten(1).mean(1).tolist()
            v["ssim"] += ssim(y.clamp(-1, 1), x).tolist()
            if lpips_net is not None:
                dev = next(lpips_net.parameters()).device
                v["lpips"] += lpips_net(y.to(dev), x.to(dev)).flatten().tolist()
            if identity is not None:
                e_y = F.normalize(identity.embed(y.clamp(-1, 1)), dim=1)
                e_x = F.normalize(identity.embed(x), dim=1)
                v["id_similarity"] += (e_y * e_x).sum(1).tolist()
            if dlib_identity is not None:
                v["identity_dlib"] += dlib_identity.similarity(y, x).tolist()
            row.append(y.clamp(-1, 1))
        shown.extend(torch.stack(row, 1))

    for batch in _batches(images, batch_size):
        flush(batch)
    return values, shown


@torch.no_grad()
def editability(
    encoder,
    generator,
    images: Iterable[torch.Tensor],
    direction: np.ndarray,
    strengths: Iterable[float],
    batch_size: int,
    dlib_identity=None,
    precision: str = "fp32",
) -> dict:
    """How a yaw ``direction`` (n_styles, style_dim) moves ``encoder``'s reconstructions of
    uint8 (3, H, W) ``images``: each code gets ``w + s * direction`` for every strength s, and
    the yaw of the rendered face is re-measured from its landmarks
    (:func:`mambastyle.identity.aligned_pose`, the prepare stage's pose fit).

    Returns ``yaw_per_strength`` (degrees per unit of strength: the least-squares slope of the
    yaw change against s through the origin), ``linearity_r2`` (how much of the yaw change that
    line explains; 1 = exactly proportional), ``yaw_change`` (mean change per strength),
    ``identity_kept_dlib`` (mean identity_dlib of the edited face against the unedited
    reconstruction; without ``dlib_identity``: absent) and the counts.
    """
    from mambastyle.identity import aligned_pose

    strengths = [float(s) for s in strengths if float(s) != 0.0]
    d = torch.as_tensor(np.asarray(direction, np.float32))
    device = encoder.latent_avg.device
    changes: dict[float, list[float]] = {s: [] for s in strengths}
    kept: list[float] = []

    def render(w: torch.Tensor) -> torch.Tensor:
        y = _run(precision, generator.synthesis, w.to(generator.latent_avg.device), noise_mode="const")
        return y.clamp(-1, 1).cpu()

    def flush(batch: torch.Tensor) -> None:
        w = _run(precision, encoder, prepare_images(batch, encoder.config.input_size).to(device)).cpu()
        y0 = render(w)
        yaw0 = aligned_pose(y0)[:, 0]
        for s in strengths:
            ys = render(w + s * d)
            changes[s] += (aligned_pose(ys)[:, 0] - yaw0).tolist()
            if dlib_identity is not None:
                kept.extend(dlib_identity.similarity(ys, y0).tolist())

    for batch in _batches(images, batch_size):
        flush(batch)
    s_all = np.array([s for s in strengths for _ in changes[s]], np.float64)
    dy = np.array([v for s in strengths for v in changes[s]], np.float64)
    if dy.size == 0:
        raise ValueError("no faces to measure editability on")
    slope = float((s_all * dy).sum() / (s_all * s_all).sum())
    total = float((dy * dy).sum())
    r2 = 1.0 - float(((dy - slope * s_all) ** 2).sum()) / total if total > 0 else 0.0
    out = {
        "yaw_per_strength": slope,
        "linearity_r2": r2,
        "yaw_change": {f"{s:g}": float(np.mean(changes[s])) for s in strengths},
        "faces": len(changes[strengths[0]]),
        "strengths": strengths,
    }
    if dlib_identity is not None:
        out["identity_kept_dlib"] = float(np.mean(kept))
    return out
