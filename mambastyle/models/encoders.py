"""Image -> W+ encoders, built by name from a registry.

Every encoder takes (B, 3, S, S) images in [-1, 1] (S = ``input_size``, 256 by default)
and returns (B, n_styles, style_dim) W+ codes: predicted offsets added to the
generator's ``latent_avg`` (a buffer the encoder carries, set from the generator).
``n_styles`` follows the generator's resolution (2 * log2(res) - 2).

- ``mambastyle``: IR-SE backbone ([2, 2, 5, 2] units), top-down FPN at input/4, /8,
  /16 (64², 32², 16² for 256-px input), one VSS block per level, a patch-embedding
  branch added at /8, and three pooled linear style heads (coarse codes from the finest
  map, fine codes from the coarsest, as in the published code). ~55M parameters at 1024 px.
- ``mambastyle_small`` / ``mambastyle_tiny``: the same architecture at reduced width
  and depth, for CPU runs, the demo and tests.
- ``psp``: the pSp CNN baseline (IR-SE50 + FPN + one GradualStyleBlock per style),
  ~267M parameters at 1024 px; ``psp_tiny`` is its narrow twin.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.errors import InvalidConfig, check_at_least
from mambastyle.layers.selective_scan import Backend
from mambastyle.layers.ss2d import VSSBlock
from mambastyle.models.stylegan2 import EqualLinear


def n_styles_for(resolution: int) -> int:
    """Number of W+ codes of a StyleGAN2 generator of ``resolution`` px."""
    if resolution < 4 or resolution & (resolution - 1):
        raise InvalidConfig("resolution", f"must be a power of two >= 4, got {resolution}")
    return 2 * int(math.log2(resolution)) - 2


def style_split(n_styles: int) -> tuple[int, int, int]:
    """(coarse, medium, fine) code counts: codes 0-3 (4-8 px layers), 4-8, and the rest.

    18 -> (4, 5, 9) as in the published MambaStyle code; 14 -> (4, 5, 5); 8 -> (4, 4, 0).
    """
    coarse = min(4, n_styles)
    medium = min(5, n_styles - coarse)
    return coarse, medium, n_styles - coarse - medium


@dataclass(frozen=True)
class EncoderConfig:
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
        if self.input_size < 32 or self.input_size & (self.input_size - 1):
            raise InvalidConfig("input_size", f"must be a power of two >= 32, got {self.input_size}")
        if len(self.widths) != 4 or len(self.units) != 4 or min(self.units) < 1 or min(self.widths) < 1:
            raise InvalidConfig("units", "widths and units need 4 positive entries (one per backbone stage)")
        object.__setattr__(self, "widths", tuple(int(v) for v in self.widths))
        object.__setattr__(self, "units", tuple(int(v) for v in self.units))
        pools = tuple(tuple(int(v) for v in p) for p in self.head_pools)
        if len(pools) != 3 or any(len(p) != 3 or min(p) < 1 for p in pools):
            raise InvalidConfig("head_pools", f"needs three (channels, h, w) triples, got {self.head_pools}")
        object.__setattr__(self, "head_pools", pools)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        return config_from_dict(cls, data, "encoder")


def config_from_dict(cls, data: dict, what: str):
    """Architecture config dataclass ``cls`` from a checkpoint's dict; an unknown key is an error."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InvalidConfig(unknown[0], f"unknown {what} config key")
    return cls(**data)


# --------------------------------------------------------------------------- IR-SE backbone


class SEModule(nn.Module):
    """Squeeze-and-excitation channel gate."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class Subsample(nn.Module):
    """Keeps every ``stride``-th pixel: the identity shortcut of a strided unit (a 1x1 max-pool)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stride == 1 else x[:, :, :: self.stride, :: self.stride]


class BottleneckIRSE(nn.Module):
    """ArcFace's improved residual unit with SE: BN-conv-PReLU-conv(stride)-BN-SE + shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = Subsample(stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSEBackbone(nn.Module):
    """Input stem + four stages of IR-SE units (first unit of each stage has stride 2).

    Returns the outputs of stages 2, 3 and 4: (B, w1, S/4, S/4), (B, w2, S/8, S/8),
    (B, w3, S/16, S/16) for an (B, 3, S, S) input.
    """

    def __init__(self, widths: tuple[int, ...], units: tuple[int, ...]):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0])
        )
        body, taps, in_c = [], [], widths[0]
        for depth, n in zip(widths, units, strict=True):
            for i in range(n):
                body.append(BottleneckIRSE(in_c, depth, 2 if i == 0 else 1))
                in_c = depth
            taps.append(len(body) - 1)
        self.body = nn.Sequential(*body)
        self.taps = tuple(taps[1:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.input_layer(x)
        feats = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                feats.append(x)
        return feats


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinearly upsamples x to y's size and adds y (the FPN merge)."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


# --------------------------------------------------------------------------- encoders


class Encoder(nn.Module):
    """Shared contract: config, ``latent_avg`` buffer, input checks."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.register_buffer("latent_avg", torch.zeros(config.style_dim))

    @property
    def n_styles(self) -> int:
        return self.config.n_styles

    def set_latent_avg(self, latent_avg: torch.Tensor) -> None:
        """Copies the generator's average W, (style_dim,), into the encoder."""
        self.latent_avg.copy_(latent_avg.detach().reshape(self.config.style_dim))

    def _check_input(self, x: torch.Tensor) -> None:
        s = self.config.input_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}) in [-1, 1], got {tuple(x.shape)}")


class StyleHead(nn.Module):
    """BatchNorm, pooling over channels and space to (c, h, w), linear to ``n`` codes."""

    def __init__(self, in_channels: int, pool: tuple[int, int, int], n: int, style_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.pool = nn.AdaptiveAvgPool3d(pool)
        self.linear = nn.Linear(math.prod(pool), n * style_dim)
        self.n, self.style_dim = n, style_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n, style_dim)."""
        x = self.pool(self.norm(x).unsqueeze(1)).flatten(1)  # (B, c * h * w)
        return self.linear(x).view(-1, self.n, self.style_dim)


class MambaStyleEncoder(Encoder):
    """IR-SE backbone + FPN + one VSS block per level + pooled style heads."""

    def __init__(self, config: EncoderConfig, scan_backend: Backend = "auto"):
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

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x: (B, 3, S, S) -> W+ (B, n_styles, D); with ``return_features`` also the
        (B, fpn_dim, S/4, S/4) feature map for feature-space (F-space) refinement."""
        self._check_input(x)
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
        w_plus = codes + self.latent_avg
        if return_features:
            return w_plus, self.feature_adapter(p1)
        return w_plus


class GradualStyleBlock(nn.Module):
    """pSp's per-style head: stride-2 conv + LeakyReLU down to 1x1, then a linear layer to W."""

    def __init__(self, channels: int, style_dim: int, spatial: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(max(1, int(math.log2(spatial)))):
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(channels, style_dim, lr_mul=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # already 1x1 at the nominal input size
        return self.linear(x)


class PSPEncoder(Encoder):
    """pSp baseline: IR-SE backbone + FPN; styles 0-2 from /16, 3-6 from /8, the rest from /4."""

    COARSE, MIDDLE = 3, 7

    def __init__(self, config: EncoderConfig, scan_backend: Backend = "auto"):
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

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x: (B, 3, S, S) -> W+ (B, n_styles, D) (features: the /4 FPN map)."""
        self._check_input(x)
        c1, c2, c3 = self.backbone(x)
        p3 = self.lateral3(c3)
        p2 = _upsample_add(p3, self.lateral2(c2))
        p1 = _upsample_add(p2, self.lateral1(c1))
        maps = [p3 if i < self.COARSE else p2 if i < self.MIDDLE else p1 for i in range(self.n_styles)]
        codes = torch.stack([blk(m) for blk, m in zip(self.styles, maps, strict=True)], dim=1)
        w_plus = codes + self.latent_avg
        return (w_plus, p1) if return_features else w_plus


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: architecture defaults (n_styles comes from the generator)."""

    name: str
    defaults: dict = field(default_factory=dict)
    description: str = ""


ENCODERS: dict[str, EncoderSpec] = {}
ARCHITECTURES: dict[str, type[Encoder]] = {"mambastyle": MambaStyleEncoder, "psp": PSPEncoder}


def register(name: str, description: str, **defaults) -> None:
    """Registers a named configuration; ``defaults['arch']`` picks the architecture."""
    if defaults.get("arch") not in ARCHITECTURES:
        raise ValueError(f"encoder {name!r}: arch must be one of {sorted(ARCHITECTURES)}")
    ENCODERS[name] = EncoderSpec(name, defaults, description)


register("mambastyle", "IR-SE34 + FPN + VSS blocks (published configuration)", arch="mambastyle")
register(
    "mambastyle_small",
    "half-width MambaStyle for CPU training",
    arch="mambastyle",
    widths=(32, 64, 128, 256),
    units=(2, 2, 3, 2),
    fpn_dim=256,
    head_pools=((32, 6, 6), (32, 4, 4), (64, 3, 3)),
    patch_pool=12,
)
register(
    "mambastyle_tiny",
    "narrow MambaStyle for the CPU demo and tests",
    arch="mambastyle",
    widths=(16, 32, 64, 128),
    units=(1, 1, 2, 1),
    fpn_dim=64,
    d_state=8,
    head_pools=((8, 4, 4), (8, 3, 3), (16, 2, 2)),
    patch_pool=6,
)
register("psp", "pSp baseline: IR-SE50 + FPN + GradualStyleBlocks", arch="psp", units=(3, 4, 14, 3))
register(
    "psp_tiny",
    "narrow pSp baseline for tests",
    arch="psp",
    widths=(16, 32, 64, 128),
    units=(1, 1, 2, 1),
    fpn_dim=64,
)


def encoder_config(name: str, resolution: int = 1024, **overrides) -> EncoderConfig:
    """The configuration of registered encoder ``name`` for a generator of ``resolution`` px."""
    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; registered: {', '.join(sorted(ENCODERS))}")
    values = {**ENCODERS[name].defaults, "n_styles": n_styles_for(resolution), **overrides}
    return EncoderConfig.from_dict(values)


def build_encoder_from_config(config: EncoderConfig, scan_backend: Backend = "auto") -> Encoder:
    return ARCHITECTURES[config.arch](config, scan_backend=scan_backend)


def build_encoder(
    name: str, resolution: int = 1024, seed: int | None = None, scan_backend: Backend = "auto", **overrides
) -> Encoder:
    """Builds registered encoder ``name`` for a ``resolution``-px generator (seeded init if given)."""
    config = encoder_config(name, resolution, **overrides)
    if seed is None:
        return build_encoder_from_config(config, scan_backend)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder_from_config(config, scan_backend)
