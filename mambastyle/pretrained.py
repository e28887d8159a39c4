"""Pretrained networks read from files, never downloaded: LPIPS (its AlexNet backbone from
torchvision's weights, its linear heads from the ``lpips`` package) and ArcFace IR-SE50 for
identity. Training losses and the evaluate and invert metrics load them here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.checkpoints import checkpoint_source, read_checkpoint, unwrap_state_dict
from mambastyle.errors import CheckpointError
from mambastyle.models.arcface import INPUT_SIZE, ArcFaceIRSE
from mambastyle.storage import StorageOptions, resolve

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
