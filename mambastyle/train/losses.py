"""Training losses: pixel L2, LPIPS, ArcFace identity, W-norm and latent recovery.

Pretrained networks (LPIPS' AlexNet backbone, ArcFace IR-SE50) are read by
:mod:`mambastyle.pretrained` from files named in params.yaml and never downloaded.
:func:`build_loss` reports, for every weighted term, whether it is on and why not: a missing
file switches its term off with a logged reason, or stops the run with
:class:`MissingWeights` when the params require the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.config import LossParams, PretrainedParams
from mambastyle.pretrained import (
    IdentityLoss,
    MissingWeights,
    alexnet_hub_path,
    build_lpips,
    load_arcface,
    weights_available,
)
from mambastyle.storage import StorageOptions

log = logging.getLogger(__name__)

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
