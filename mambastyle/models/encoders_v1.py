"""Encoders as this project saved them in checkpoint format version 1, before the registered
architectures took the published module layouts: kept so that those files still load.

``load_v1_encoder`` rebuilds one from a version-1 checkpoint dict (config + state dict) and
renames the few keys whose modules were renamed since (VSS blocks: ``ss2d`` ->
``self_attention``, ``ln_out`` -> ``norm``); the stored ``latent_avg`` becomes the encoder's
average code. Nothing here is built for new work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.errors import InvalidConfig, check_at_least
from mambastyle.layers.selective_scan import Backend
from mambastyle.layers.ss2d import VSSBlock
from mambastyle.models.encoders import (
    ChannelSpacePool,
    Encoder,
    GradualStyleBlock,
    _upsample_add,
    check_backbone_fields,
    config_from_dict,
    irse_body,
    irse_stem,
    run_body,
    style_split,
)


@dataclass(frozen=True)
class EncoderConfigV1:
    """Architecture of an encoder; saved in its checkpoints so it can be rebuilt by name alone."""

    arch: Literal["mambastyle", "psp"]
    n_styles: int
    style_dim: int = 512
    input_size: int = 256
    widths: tuple[int, ...] = (64, 128, 256, 512)  # backbone stage widths
    units: tuple[int, ...] = (2, 2, 5, 2)  # IR-SE units per stage
    fpn_dim: int = 512
    # mambastyle only
    d_state: int = 16
    expand: float = 2.0
    head_pools: tuple[tuple[int, int, int], ...] = ((64, 9, 9), (64, 6, 6), (128, 5, 5))
    patch_pool: int = 18  # 0 disables the patch-embedding branch

    def __post_init__(self) -> None:
        if self.arch not in ("mambastyle", "psp"):
            raise InvalidConfig("arch", f"must be 'mambastyle' or 'psp', got {self.arch!r}")
        check_at_least(self, 1, "n_styles", "style_dim", "fpn_dim", "d_state")
        check_backbone_fields(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfigV1:
        return config_from_dict(cls, data, "encoder")


class IRSEBackbone(nn.Module):
    """Input stem + four stages of IR-SE units; returns the outputs at input/4, /8, /16."""

    def __init__(self, widths: tuple[int, ...], units: tuple[int, ...]):
        super().__init__()
        self.input_layer = irse_stem(3, widths[0])
        self.body, self.taps = irse_body(widths, units)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_body(self.input_layer, self.body, self.taps, x)


class StyleHead(nn.Module):
    """BatchNorm, pooling over channels and space to (c, h, w), linear to ``n`` codes."""

    def __init__(self, in_channels: int, pool: tuple[int, int, int], n: int, style_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.pool = ChannelSpacePool(pool)
        self.linear = nn.Linear(math.prod(pool), n * style_dim)
        self.n, self.style_dim = n, style_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n, style_dim)."""
        x = self.pool(self.norm(x).unsqueeze(1)).flatten(1)  # (B, c * h * w)
        return self.linear(x).view(-1, self.n, self.style_dim)


class MambaStyleEncoderV1(Encoder):
    """IR-SE backbone + FPN + one VSS block per level + pooled style heads."""

    def __init__(self, config: EncoderConfigV1, scan_backend: Backend = "auto"):
        super().__init__(config)
        cfg, dim = config, config.fpn_dim
        w = cfg.widths
        self.backbone = IRSEBackbone(w, cfg.units)
        self.lateral = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in (w[1], w[2], w[3])])
        vss = {"d_state": cfg.d_state, "expand": cfg.expand, "scan_backend": scan_backend}
        self.vss = nn.ModuleList([VSSBlock(dim, **vss) for _ in range(3)])  # levels /4, /8, /16
        if cfg.patch_pool > 0:
            self.patch_embed = nn.Conv2d(3, dim, 8, stride=8)
            self.patch_proj = nn.Conv2d(dim, dim, 1)
        self.heads = nn.ModuleList(
            [
                StyleHead(dim, pool, n, cfg.style_dim)
                for pool, n in zip(cfg.head_pools, style_split(cfg.n_styles), strict=True)
                if n > 0
            ]
        )
        self.feature_adapter = nn.Conv2d(dim, dim, 3, padding=1)

    @staticmethod
    def _vss(block: VSSBlock, x: torch.Tensor) -> torch.Tensor:
        return block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last inside

    def offsets(self, x: torch.Tensor, features: bool = False):
        c1, c2, c3 = self.backbone(x)  # /4, /8, /16
        p3 = self._vss(self.vss[2], self.lateral[2](c3))
        p2 = _upsample_add(p3, self.lateral[1](c2))
        if self.config.patch_pool > 0:
            patches = self.patch_embed(x)  # (B, dim, S/8, S/8)
            patches = self.patch_proj(F.adaptive_avg_pool2d(patches, self.config.patch_pool))
            p2 = p2 + F.interpolate(patches, size=p2.shape[-2:], mode="bilinear", align_corners=False)
        p2 = self._vss(self.vss[1], p2)
        p1 = self._vss(self.vss[0], _upsample_add(p2, self.lateral[0](c1)))
        levels = [p1, p2, p3]  # coarse codes from the finest map
        codes = torch.cat([head(level) for head, level in zip(self.heads, levels, strict=False)], dim=1)
        return codes, (self.feature_adapter(p1) if features else None)


class PSPEncoderV1(Encoder):
    """pSp baseline: IR-SE backbone + FPN; styles 0-2 from /16, 3-6 from /8, the rest from /4."""

    COARSE, MIDDLE = 3, 7

    def __init__(self, config: EncoderConfigV1, scan_backend: Backend = "auto"):
        super().__init__(config)
        cfg, dim = config, config.fpn_dim
        self.backbone = IRSEBackbone(cfg.widths, cfg.units)
        self.lateral3 = nn.Conv2d(cfg.widths[3], dim, 1) if cfg.widths[3] != dim else nn.Identity()
        self.lateral2 = nn.Conv2d(cfg.widths[2], dim, 1)
        self.lateral1 = nn.Conv2d(cfg.widths[1], dim, 1)
        s = cfg.input_size
        spatial = [
            s // 16 if i < self.COARSE else s // 8 if i < self.MIDDLE else s // 4 for i in range(cfg.n_styles)
        ]
        self.styles = nn.ModuleList([GradualStyleBlock(dim, cfg.style_dim, sp) for sp in spatial])

    def offsets(self, x: torch.Tensor, features: bool = False):
        c1, c2, c3 = self.backbone(x)
        p3 = self.lateral3(c3)
        p2 = _upsample_add(p3, self.lateral2(c2))
        p1 = _upsample_add(p2, self.lateral1(c1))
        maps = [p3 if i < self.COARSE else p2 if i < self.MIDDLE else p1 for i in range(self.n_styles)]
        codes = torch.stack([blk(m) for blk, m in zip(self.styles, maps, strict=True)], dim=1)
        return codes, (p1 if features else None)


ARCHITECTURES_V1 = {"mambastyle": MambaStyleEncoderV1, "psp": PSPEncoderV1}
_RENAMED = ((".ss2d.", ".self_attention."), (".ln_out.", ".norm."))


def v1_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A version-1 state dict with today's module names, and its ``latent_avg`` (None if absent)."""
    out, latent_avg = {}, None
    for key, value in state_dict.items():
        if key == "latent_avg":
            latent_avg = value
            continue
        for old, new in _RENAMED:
            if key.startswith("vss.") and old in key:
                key = key.replace(old, new, 1)
        out[key] = value
    return out, latent_avg


def build_v1_encoder(config: dict, scan_backend: Backend = "auto") -> Encoder:
    """The version-1 encoder a checkpoint's ``config`` describes (untrained)."""
    cfg = EncoderConfigV1.from_dict(config)
    return ARCHITECTURES_V1[cfg.arch](cfg, scan_backend=scan_backend)
