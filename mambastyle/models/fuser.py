"""The F-space fuser: a feature correction for the generator from encoder features and an edit.

W+ codes alone lose detail (background, hair, accessories). The fuser takes the encoder's
feature map (``Encoder(x, return_features=True)``: (B, C_enc, S/4, S/4), 64² for 256-px input)
and an edit direction in W+ (zeros for plain inversion) and predicts a correction that the
generator adds to its features at one block (``Generator.synthesis(feature_offset=...)``):

    y = G(w_hat + d, feature_offset=(inject_res, fuser(features, d)))

Architecture (sizes by name from a registry, like the encoders):

- direction branch: each layer's code is projected, all layers are mixed into a small seed
  map (``direction_grid``²) that a VSS block refines; upsampled to the feature size;
- feature branch: a 3x3 convolution of the encoder features;
- fusion: concatenation, convolution, VSS blocks over the 2-D map, two style-modulated
  convolutions conditioned on the layer-mean of the direction, and a 1x1 projection to the
  generator's channels, resized to ``inject_res`` when that differs from the feature size.

Every sample has its own direction (any batch size). The output projection starts at zero,
so an untrained fuser leaves the generator's output exactly unchanged and training starts
from the W+ reconstruction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.errors import InvalidConfig, check_at_least
from mambastyle.layers.selective_scan import Backend
from mambastyle.layers.ss2d import VSSBlock
from mambastyle.models.encoders import Encoder, config_from_dict
from mambastyle.models.stylegan2 import GeneratorConfig, ModulatedConv2d


@dataclass(frozen=True)
class FuserConfig:
    """Architecture of a fuser; saved in its checkpoints so it can be rebuilt from the file alone."""

    in_channels: int  # encoder feature channels
    feature_size: int  # encoder feature side (input_size / 4)
    out_channels: int  # generator channels at inject_res
    inject_res: int  # the generator block whose features are corrected
    n_styles: int
    style_dim: int
    dim: int = 512  # working width
    direction_dim: int = 128  # channels of the direction map
    direction_grid: int = 8  # side of the direction seed map
    vss_blocks: int = 1
    d_state: int = 16
    expand: float = 2.0

    def __post_init__(self) -> None:
        check_at_least(self, 1, "in_channels", "feature_size", "out_channels", "n_styles", "style_dim",
                       "dim", "direction_dim", "direction_grid", "d_state")  # fmt: skip
        check_at_least(self, 0, "vss_blocks")
        for key in ("inject_res", "feature_size"):
            value = getattr(self, key)
            if value < 4 or value & (value - 1):
                raise InvalidConfig(key, f"must be a power of two >= 4, got {value}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FuserConfig:
        return config_from_dict(cls, data, "fuser")


class Fuser(nn.Module):
    """(features (B, C_enc, s, s), direction (B, n_styles, D)) -> (B, C_gen, r, r) correction."""

    def __init__(self, config: FuserConfig, scan_backend: Backend = "auto"):
        super().__init__()
        self.config = cfg = config
        vss = {"d_state": cfg.d_state, "expand": cfg.expand, "scan_backend": scan_backend}
        self.direction_proj = nn.Linear(cfg.style_dim, cfg.direction_dim)
        grid = cfg.direction_grid
        self.direction_mix = nn.Linear(cfg.n_styles * cfg.direction_dim, cfg.direction_dim * grid * grid)
        self.direction_vss = VSSBlock(cfg.direction_dim, **vss)
        self.direction_conv = nn.Conv2d(cfg.direction_dim, cfg.dim, 3, padding=1)
        self.feature_conv = nn.Conv2d(cfg.in_channels, cfg.dim, 3, padding=1)
        self.fuse = nn.Conv2d(2 * cfg.dim, cfg.dim, 3, padding=1)
        self.vss = nn.ModuleList([VSSBlock(cfg.dim, **vss) for _ in range(cfg.vss_blocks)])
        self.modulated = nn.ModuleList(
            [ModulatedConv2d(cfg.dim, cfg.dim, 3, cfg.style_dim) for _ in range(2)]
        )
        self.out = nn.Conv2d(cfg.dim, cfg.out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _vss(block: VSSBlock, x: torch.Tensor) -> torch.Tensor:
        return block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, features: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = features.shape[0]
        if features.ndim != 4 or features.shape[1:] != (cfg.in_channels, cfg.feature_size, cfg.feature_size):
            raise ValueError(
                f"features must be (B, {cfg.in_channels}, {cfg.feature_size}, {cfg.feature_size}), "
                f"got {tuple(features.shape)}"
            )
        if (
            direction.ndim != 3
            or direction.shape[1:] != (cfg.n_styles, cfg.style_dim)
            or (direction.shape[0] not in (1, b))
        ):
            raise ValueError(
                f"direction must be ({b} or 1, {cfg.n_styles}, {cfg.style_dim}), got {tuple(direction.shape)}"
            )
        direction = direction.expand(b, -1, -1).to(features.dtype)
        act = F.leaky_relu
        g = cfg.direction_grid
        seed = self.direction_mix(act(self.direction_proj(direction), 0.2).flatten(1))
        hd = self._vss(self.direction_vss, seed.view(b, cfg.direction_dim, g, g))
        hd = F.interpolate(hd, size=(cfg.feature_size,) * 2, mode="bilinear", align_corners=False)
        hd = act(self.direction_conv(hd), 0.2)
        hm = act(self.feature_conv(features), 0.2)
        x = act(self.fuse(torch.cat([hm, hd], dim=1)), 0.2)
        for block in self.vss:
            x = self._vss(block, x)
        style = direction.mean(dim=1)  # (B, D)
        for conv in self.modulated:
            x = act(conv(x, style), 0.2)
        out = self.out(x)
        if cfg.inject_res != cfg.feature_size:
            out = F.interpolate(out, size=(cfg.inject_res,) * 2, mode="bilinear", align_corners=False)
        return out


def fused_synthesis(generator, fuser: Fuser, w_plus: torch.Tensor, features: torch.Tensor,
                    direction: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``G(w_plus, feature_offset = fuser(features, direction))`` with constant noise: the picture of
    codes ``w_plus`` (any edit already added) corrected by the fuser for the edit ``direction``
    ((B or 1, n_styles, D); zero, plain inversion, when None)."""
    if direction is None:
        direction = w_plus.new_zeros(1, *w_plus.shape[1:])
    offset = fuser(features, direction)
    return generator.synthesis(w_plus, noise_mode="const", feature_offset=(fuser.config.inject_res, offset))


class FuserModel(nn.Module):
    """The encoder and the fuser as one module: what a fuser training run trains and saves."""

    def __init__(self, encoder: Encoder, fuser: Fuser):
        super().__init__()
        self.encoder, self.fuser = encoder, fuser

    @property
    def input_size(self) -> int:
        return self.encoder.config.input_size

    @property
    def inject_res(self) -> int:
        return self.fuser.config.inject_res

    @property
    def latent_avg(self) -> torch.Tensor:
        return self.encoder.latent_avg

    def forward(self, x: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images, (B or 1, n_styles, D) directions -> (W+ codes, feature correction)."""
        w_hat, features = self.encoder(x, return_features=True)
        return w_hat, self.fuser(features, direction)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class FuserSpec:
    name: str
    defaults: dict = field(default_factory=dict)
    description: str = ""


FUSERS: dict[str, FuserSpec] = {}


def register(name: str, description: str, **defaults) -> None:
    FUSERS[name] = FuserSpec(name, defaults, description)


register("fuser", "published width: 512 channels, one VSS block", dim=512, direction_dim=128)
register("fuser_small", "half width", dim=256, direction_dim=64)
register(
    "fuser_tiny", "narrow, for the CPU demo and tests", dim=32, direction_dim=16, direction_grid=4, d_state=8
)


def default_inject_res(feature_size: int, generator: GeneratorConfig) -> int:
    """The generator block matching the encoder's feature map: its side, or the largest block
    below the output resolution when the generator is smaller (64² for a 1024-px generator and
    256-px encoder input; 16² for the 64-px demo)."""
    return min(feature_size, generator.resolution // 2)


def fuser_config(
    name: str, encoder_config, generator: GeneratorConfig, inject_res: int | None = None, **overrides
) -> FuserConfig:
    """The configuration of registered fuser ``name`` for an encoder and a generator."""
    if name not in FUSERS:
        raise KeyError(f"unknown fuser {name!r}; registered: {', '.join(sorted(FUSERS))}")
    feature_size = encoder_config.input_size // 4
    res = default_inject_res(feature_size, generator) if inject_res is None else inject_res
    if res not in {2**i for i in range(2, generator.log_size + 1)}:
        raise InvalidConfig("inject_res", f"{res} is not a block of a {generator.resolution}-px generator")
    values = {
        "in_channels": encoder_config.fpn_dim,
        "feature_size": feature_size,
        "out_channels": generator.channels(res),
        "inject_res": res,
        "n_styles": generator.n_styles,
        "style_dim": generator.style_dim,
        **FUSERS[name].defaults,
        **overrides,
    }
    return FuserConfig.from_dict(values)


def build_fuser_from_config(config: FuserConfig, scan_backend: Backend = "auto") -> Fuser:
    return Fuser(config, scan_backend=scan_backend)


def build_fuser(
    name: str, encoder_config, generator: GeneratorConfig, seed: int | None = None,
    scan_backend: Backend = "auto", inject_res: int | None = None, **overrides,
) -> Fuser:  # fmt: skip
    """Builds registered fuser ``name`` for an encoder and generator (seeded init if given)."""
    config = fuser_config(name, encoder_config, generator, inject_res, **overrides)
    if seed is None:
        return build_fuser_from_config(config, scan_backend)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_fuser_from_config(config, scan_backend)
