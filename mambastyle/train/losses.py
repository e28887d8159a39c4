"""Training losses: pixel L2, LPIPS, ArcFace identity, W-norm and latent recovery.

Pretrained networks (LPIPS' AlexNet backbone, ArcFace IR-SE50) are read from files named
in params.yaml and never downloaded. :func:`build_loss` reports, for every weighted term,
whether it is on and why not: a missing file switches its term off with a logged reason,
or stops the run with :class:`MissingWeights` when the params require the weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.checkpoints import checkpoint_source, read_checkpoint, unwrap_state_dict
from mambastyle.config import LossParams, PretrainedParams
from mambastyle.errors import CheckpointError
from mambastyle.models.arcface import INPUT_SIZE, ArcFaceIRSE
from mambastyle.storage import StorageOptions, resolve

log = logging.getLogger(__name__)

ALEXNET_HUB_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet weights, as the hub caches them
# pSp/e4e/MambaStyle crop the face to rows 35:223, cols 32:220 of a 256-px aligned image
# before ArcFace; the same fractions are used at any size.
ID_CROP = (35 / 256, 223 / 256, 32 / 256, 220 / 256)


class MissingWeights(RuntimeError):
    """A loss term is weighted and required, but its pretrained weights are not available."""


def _load_state_dict(uri: str, options: StorageOptions | None) -> dict[str, torch.Tensor]:
    """A plain state dict from a local path or s3:// URI (``weights_only`` loading)."""
    sd = read_checkpoint(checkpoint_source(uri, options))
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{uri}: expected a state dict of tensors")
    return unwrap_state_dict(sd)


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], uri: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{k}: shape {tuple(sd[k].shape)}, expected {tuple(expected[k].shape)}")
        raise CheckpointError(f"{uri}: weights do not fit {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------- LPIPS


def alexnet_hub_path() -> str:
    """Where torchvision's AlexNet weights sit in the torch hub cache (may not exist)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_HUB_FILE)


def build_lpips(alexnet_weights: str, options: StorageOptions | None = None) -> nn.Module:
    """LPIPS (v0.1, AlexNet) with its backbone from ``alexnet_weights`` (a torchvision AlexNet
    state dict) and the linear heads that ship inside the ``lpips`` package. Frozen, eval mode."""
    import lpips

    sd = _load_state_dict(alexnet_weights, options)
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    # The package splits AlexNet's ``features`` into slices that keep the layer indices:
    # features.{i}.weight lives at slice{k}.{i}.weight.
    remapped = {}
    for slice_name, block in model.net.named_children():
        for index in block._modules:
            for param in ("weight", "bias"):
                key = f"features.{index}.{param}"
                if key in sd:
                    remapped[f"{slice_name}.{index}.{param}"] = sd[key]
    _load_strict(model.net, remapped, alexnet_weights)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- identity


def load_arcface(uri: str, options: StorageOptions | None = None) -> ArcFaceIRSE:
    """ArcFace IR-SE50 from a ``model_ir_se50.pth``-layout state dict. Frozen, eval mode."""
    model = ArcFaceIRSE()
    _load_strict(model, _load_state_dict(uri, options), uri)
    return model.eval().requires_grad_(False)


class IdentityLoss(nn.Module):
    """1 - cosine similarity of ArcFace embeddings of the face crops, batch mean."""

    def __init__(self, arcface: nn.Module):
        super().__init__()
        self.arcface = arcface

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        top, bottom, left, right = (round(f * s) for f in ID_CROP)
        face = x[:, :, top:bottom, left:right]
        return self.arcface(F.adaptive_avg_pool2d(face, INPUT_SIZE))

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.embed(y)
        return (1.0 - (self.embed(y_hat) * target).sum(dim=1)).mean()


# --------------------------------------------------------------------------- the total


def w_norm(w_plus: torch.Tensor, latent_avg: torch.Tensor) -> torch.Tensor:
    """Batch mean of the Frobenius norm of each code's offset from ``latent_avg``."""
    return (w_plus - latent_avg).flatten(1).norm(dim=1).mean()


@dataclass
class LossStatus:
    """Which weighted terms are on, and why the others are off."""

    active: dict[str, float] = field(default_factory=dict)
    off: dict[str, str] = field(default_factory=dict)


class TrainingLoss(nn.Module):
    """Weighted sum of the active terms.

    ``forward(y_hat, y, w_hat, latent_avg, w_true)`` returns (total, per-term values as
    floats). ``w_true`` (synthetic steps) adds the latent-recovery term.
    """

    def __init__(
        self, weights: LossParams, lpips_net: nn.Module | None = None, arcface: nn.Module | None = None
    ):
        super().__init__()
        self.weights = weights
        self.lpips = lpips_net
        self.identity = IdentityLoss(arcface) if arcface is not None else None

    def forward(
        self,
        y_hat: torch.Tensor,
        y: torch.Tensor,
        w_hat: torch.Tensor,
        latent_avg: torch.Tensor,
        w_true: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        wt = self.weights
        terms: dict[str, torch.Tensor] = {}
        if wt.l2 > 0:
            terms["l2"] = F.mse_loss(y_hat, y)
        if wt.lpips > 0 and self.lpips is not None:
            terms["lpips"] = self.lpips(y_hat, y).mean()
        if wt.id > 0 and self.identity is not None:
            terms["id"] = self.identity(y_hat, y)
        if wt.w_norm > 0:
            terms["w_norm"] = w_norm(w_hat, latent_avg)
        if wt.latent > 0 and w_true is not None:
            terms["latent"] = F.mse_loss(w_hat, w_true)
        total = sum((getattr(wt, k) * v for k, v in terms.items()), torch.zeros((), device=y.device))
        return total, {k: float(v.detach()) for k, v in terms.items()}


def weights_available(uri: str | None, options: StorageOptions | None = None) -> bool:
    """Whether a pretrained-weights URI can be used: an existing local file, or any s3:// URI
    (an S3 object that turns out missing is reported when it is read)."""
    if uri is None:
        return False
    try:
        loc = resolve(uri, options)
    except ValueError:
        return False
    return loc.is_s3 or os.path.isfile(loc.path)


def build_loss(
    weights: LossParams, pretrained: PretrainedParams, options: StorageOptions | None = None
) -> tuple[TrainingLoss, LossStatus]:
    """The training loss for ``weights``, with each pretrained network loaded from its file.

    Raises:
        MissingWeights: a weighted term's file is missing and ``pretrained.required`` is set.
        CheckpointError: a file exists but is not the network it should be.
    """
    status = LossStatus()
    nets: dict[str, nn.Module | None] = {"lpips": None, "id": None}
    sources = {
        "lpips": (pretrained.lpips_alexnet or alexnet_hub_path(), build_lpips, "pretrained.lpips_alexnet"),
        "id": (pretrained.arcface, load_arcface, "pretrained.arcface"),
    }
    for term, (uri, loader, key) in sources.items():
        if getattr(weights, term) <= 0:
            continue
        if not weights_available(uri, options):
            reason = f"no weights: {key} is null" if uri is None else f"no weights at {uri} ({key})"
            if pretrained.required:
                raise MissingWeights(f"loss term {term!r} is weighted but has {reason}")
            status.off[term] = reason
            log.warning("loss term %r is off: %s", term, reason)
            continue
        nets[term] = loader(uri, options)
    loss = TrainingLoss(weights, lpips_net=nets["lpips"], arcface=nets["id"])
    for term in ("l2", "lpips", "id", "w_norm", "latent"):
        if getattr(weights, term) > 0 and term not in status.off:
            status.active[term] = getattr(weights, term)
    return loss, status
