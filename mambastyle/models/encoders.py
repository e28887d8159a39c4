"""Image -> W+ encoders, built by name from a registry.

Every encoder takes (B, 3, S, S) images in [-1, 1] (S = ``input_size``, 256 by default) and
returns (B, n_styles, style_dim) absolute W+ codes: the network's offsets plus ``latent_avg``
(a non-persistent (n_styles, style_dim) buffer set from the generator or from a checkpoint;
zeros where the publisher's inference adds nothing). ``n_styles`` follows the generator's
resolution (2 * log2(res) - 2).

Each architecture has the module names, shapes, buffers and forward pass of its published
code, so that the ``encoder.*`` weights of an official checkpoint load into it with
``strict=True`` (see :mod:`mambastyle.checkpoints` for the file layouts):

- ``mambastyle``: MambaStyle's ``Backbone_Mamba_ffhq`` (JhEdLp/MambaStyle): IR-SE34, FPN at
  input/4, /8, /16, a patch-embedding branch added at /8, one VSS block per level, and three
  pooled linear heads (coarse codes from the finest map). 56.75M parameters at 1024 px.
- ``psp``: pSp's ``GradualStyleEncoder`` (IR-SE50 + FPN + one GradualStyleBlock per style).
- ``e4e``: e4e's ``Encoder4Editing``: the same modules as pSp; one base code from the /16 map
  repeated over all styles, plus a delta per style (all active, as at inference).
- ``restyle_psp`` / ``restyle_e4e``: ReStyle's ``BackboneEncoder`` / ``ProgressiveBackboneEncoder``:
  a 6-channel IR-SE50 (image + current reconstruction) with every style from the /16 map,
  refined ``n_iters`` times with the generator in the loop (:meth:`ReStyleEncoder.attach_generator`).

Reduced-width variants (``*_small``, ``*_tiny``) keep the topology for CPU runs and tests.
The four published architectures share the IR-SE backbone and the registry, so they live in
one module; hence its length.
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

ARCHS = ("mambastyle", "psp", "e4e", "restyle_psp", "restyle_e4e")


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

    arch: Literal["mambastyle", "psp", "e4e", "restyle_psp", "restyle_e4e"]
    n_styles: int
    style_dim: int = 512
    input_size: int = 256
    widths: tuple[int, ...] = (64, 128, 256, 512)  # backbone stage widths; the last is the FPN width
    units: tuple[int, ...] = (2, 2, 5, 2)  # IR-SE units per stage
    # mambastyle only
    d_state: int = 16
    expand: float = 2.0
    head_pools: tuple[tuple[int, int, int], ...] = ((64, 9, 9), (64, 6, 6), (128, 5, 5))
    patch_pool: int = 18
    style_counts: tuple[int, ...] | None = None  # codes per head; None = style_split(n_styles)
    # restyle only
    n_iters: int = 5  # refinement steps (the official inference default)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InvalidConfig("arch", f"must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        check_at_least(self, 1, "n_styles", "style_dim", "d_state", "patch_pool", "n_iters")
        check_backbone_fields(self)
        if self.style_counts is not None:
            counts = tuple(int(v) for v in self.style_counts)
            if len(counts) != 3 or min(counts) < 0 or sum(counts) != self.n_styles:
                raise InvalidConfig(
                    "style_counts", f"needs three counts adding up to n_styles={self.n_styles}, got {counts}"
                )
            object.__setattr__(self, "style_counts", counts)

    @property
    def fpn_dim(self) -> int:
        """Channels of the feature maps the heads read (and of the fuser's input features)."""
        return self.widths[3]

    @property
    def input_channels(self) -> int:
        return 6 if self.arch.startswith("restyle") else 3

    @property
    def head_counts(self) -> tuple[int, int, int]:
        return self.style_counts or style_split(self.n_styles)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        return config_from_dict(cls, data, "encoder")


def check_backbone_fields(config) -> None:
    """Validates and normalises (to tuples of ints) the input size, backbone widths and units,
    and head pools of a frozen encoder config."""
    if config.input_size < 32 or config.input_size & (config.input_size - 1):
        raise InvalidConfig("input_size", f"must be a power of two >= 32, got {config.input_size}")
    widths, units = config.widths, config.units
    if len(widths) != 4 or len(units) != 4 or min(units) < 1 or min(widths) < 1:
        raise InvalidConfig("units", "widths and units need 4 positive entries (one per backbone stage)")
    object.__setattr__(config, "widths", tuple(int(v) for v in widths))
    object.__setattr__(config, "units", tuple(int(v) for v in units))
    pools = tuple(tuple(int(v) for v in p) for p in config.head_pools)
    if len(pools) != 3 or any(len(p) != 3 or min(p) < 1 for p in pools):
        raise InvalidConfig("head_pools", f"needs three (channels, h, w) triples, got {config.head_pools}")
    object.__setattr__(config, "head_pools", pools)


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


def irse_stem(in_channels: int, width: int) -> nn.Sequential:
    """``input_layer``: 3x3 conv, BatchNorm, PReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)
    )


def irse_body(widths: tuple[int, ...], units: tuple[int, ...]) -> tuple[nn.Sequential, tuple[int, ...]]:
    """``body``: four stages of IR-SE units (the first of each has stride 2), and the indices
    of the last unit of stages 2, 3 and 4 (outputs at input/4, /8, /16)."""
    body, taps, in_c = [], [], widths[0]
    for depth, n in zip(widths, units, strict=True):
        for i in range(n):
            body.append(BottleneckIRSE(in_c, depth, 2 if i == 0 else 1))
            in_c = depth
        taps.append(len(body) - 1)
    return nn.Sequential(*body), tuple(taps[1:])


def run_body(
    input_layer: nn.Module, body: nn.Sequential, taps: tuple[int, ...], x: torch.Tensor
) -> list[torch.Tensor]:
    """The stem and the IR-SE units on ``x``; the outputs of the units at ``taps``."""
    h = input_layer(x)
    out = []
    for i, unit in enumerate(body):
        h = unit(h)
        if i in taps:
            out.append(h)
    return out


# Devices whose convolution libraries run NHWC natively: oneDNN on CPUs, cuDNN on NVIDIA GPUs.
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """An image-shaped activation in the memory layout the encoders' kernels want on CPUs and
    GPUs: channels last. The convolutions then read and write NHWC without reordering (cuDNN's
    bf16 tensor-core kernels are NHWC and would otherwise convert around every call), the FPN's
    bilinear upsampling takes its channels-last kernels (on a GPU the NCHW kernel parallelises
    over output pixels alone and loops over batch x channels: 5.6 ms per call at batch 32 on
    an H200), and the VSS blocks' (B, H, W, C) views need no copy. Values are unchanged; other
    devices keep what they are given."""
    if x.device.type in CHANNELS_LAST_DEVICES:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def on_device(encoder: nn.Module, device: str | torch.device) -> nn.Module:
    """``encoder`` moved to ``device``; on CPUs and GPUs its convolution weights are stored
    channels last too (see :func:`fast_layout`), so no convolution reorders them per call."""
    encoder = encoder.to(device)
    if torch.device(device).type in CHANNELS_LAST_DEVICES:
        for module in encoder.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return encoder


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinearly upsamples x to y's size and adds y (the FPN merge)."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


# --------------------------------------------------------------------------- encoders


class Encoder(nn.Module):
    """Shared contract: config, ``latent_avg`` (non-persistent, (n_styles, style_dim)), input checks.

    ``offsets(x, features)`` is the network; ``forward`` adds ``latent_avg``.
    """

    # Parameters the published module stores but its inversion forward never reads.
    UNUSED: tuple[str, ...] = ()

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.register_buffer("latent_avg", torch.zeros(config.n_styles, config.style_dim), persistent=False)

    @property
    def n_styles(self) -> int:
        return self.config.n_styles

    def set_latent_avg(self, latent_avg: torch.Tensor) -> None:
        """Sets the average code added to the offsets: (style_dim,), (1, style_dim), or one row
        per style ((n_styles, style_dim) or (1, n_styles, style_dim))."""
        value = latent_avg.detach().to(self.latent_avg)
        s, d = self.latent_avg.shape
        if value.numel() == d:
            value = value.reshape(1, d).expand(s, d)
        elif value.numel() == s * d:
            value = value.reshape(s, d)
        else:
            raise ValueError(
                f"latent_avg of shape {tuple(latent_avg.shape)} fits neither ({d},) nor ({s}, {d})"
            )
        self.latent_avg.copy_(value)

    def _check_input(self, x: torch.Tensor) -> None:
        s = self.config.input_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}) in [-1, 1], got {tuple(x.shape)}")

    def offsets(self, x: torch.Tensor, features: bool = False):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x: (B, 3, S, S) -> W+ (B, n_styles, D); with ``return_features`` also the
        (B, fpn_dim, S/4, S/4) feature map for feature-space (F-space) refinement."""
        self._check_input(x)
        codes, feats = self.offsets(fast_layout(x), return_features)
        w_plus = codes + self.latent_avg
        return (w_plus, feats) if return_features else w_plus


class Unflatten(nn.Module):
    """(B, C, H, W) -> (B, 1, C, H, W), so that a 3-D pool reduces channels and space together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


class ChannelSpacePool(nn.AdaptiveAvgPool3d):
    """``nn.AdaptiveAvgPool3d`` over (C, H, W), computed as a 2-D adaptive pool over (H, W) and
    then a 1-D one over C. Adaptive windows are chosen per dimension, so every output averages
    the same box of inputs as the 3-D pool (equal up to float rounding); but the 2-D pool has
    channels-last kernels that read the map once, where PyTorch's 3-D pool walks it window by
    window (at MambaStyle's first head, a (8, 512, 64, 64) float32 map pooled to (64, 9, 9) on
    a CPU: 32 ms against 3.3; in bfloat16 it also sums in bfloat16, 6% off the exact means).
    Inputs other than (B, 1, C, H, W) take the 3-D pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.output_size,) * 3 if isinstance(self.output_size, int) else tuple(self.output_size)
        if x.dim() != 5 or x.shape[1] != 1 or None in size:
            return super().forward(x)
        pc, ph, pw = size
        y = F.adaptive_avg_pool2d(x[:, 0], (ph, pw))  # (B, C, ph, pw)
        b, c = y.shape[:2]
        y = F.adaptive_avg_pool1d(y.permute(0, 2, 3, 1).reshape(b * ph * pw, 1, c), pc)
        return y.view(b, ph, pw, pc).permute(0, 3, 1, 2).unsqueeze(1)  # (B, 1, pc, ph, pw)


def style_head(in_channels: int, pool: tuple[int, int, int], n: int, style_dim: int) -> nn.Sequential:
    """MambaStyle's projection head: BatchNorm, 3-D average pool to (c, h, w), linear to n codes.
    Keys ``0.*`` (BatchNorm) and ``4.*`` (Linear), as published."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        Unflatten(),
        ChannelSpacePool(pool),
        nn.Flatten(),
        nn.Linear(math.prod(pool), n * style_dim),
    )


class PatchEmbed(nn.Module):
    """Non-overlapping 8x8 patch projection (the module MambaStyle names ``proj``)."""

    def __init__(self, dim: int, patch: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MambaStyleEncoder(Encoder):
    """MambaStyle's encoder, module for module (``Backbone_Mamba_ffhq``; ``Backbone_Mamba_cars``
    with ``style_counts=(4, 4, 8)``).

    c1, c2, c3 = IR-SE outputs at /4, /8, /16; c2 <- up(c3) + latlayer1(c2) + patch branch;
    c1 <- up(c2) + latlayer2(c1); one VSS block on each level independently; the feature map
    for the fuser is ``adapt_1(c1)``; codes: head 1 on c1 (coarse), 2 on c2, 3 on c3 (fine).
    """

    UNUSED = ("in_style_proj", "skip_scale2")

    def __init__(self, config: EncoderConfig, scan_backend: Backend = "auto"):
        super().__init__(config)
        cfg = config
        w, dim = cfg.widths, cfg.fpn_dim
        self.input_layer = irse_stem(3, w[0])
        self.body, self.taps = irse_body(w, cfg.units)
        vss = {
            "d_state": cfg.d_state,
            "expand": cfg.expand,
            "scan_backend": scan_backend,
            "style_params": True,
        }
        self.SS2D_1 = VSSBlock(dim, **vss)  # noqa: N815 (published names)
        self.SS2D_2 = VSSBlock(dim, **vss)  # noqa: N815
        self.SS2D_3 = VSSBlock(dim, **vss)  # noqa: N815
        self.latlayer1 = nn.Conv2d(w[2], dim, 1)
        self.latlayer2 = nn.Conv2d(w[1], dim, 1)
        self.adapt_1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.proj = PatchEmbed(dim)
        self.new_ps = nn.Conv2d(dim, dim, 1)
        self.averagepooling = nn.AdaptiveAvgPool2d(cfg.patch_pool)
        for i, (pool, n) in enumerate(zip(cfg.head_pools, cfg.head_counts, strict=True), start=1):
            setattr(self, f"output_layer_{i}", style_head(dim, pool, n, cfg.style_dim) if n > 0 else None)
        for name, p in self.named_parameters():  # kept for the layout; frozen so DDP never waits on them
            if name.rsplit(".", 1)[0].endswith(self.UNUSED) or name.endswith(self.UNUSED):
                p.requires_grad_(False)
        # A level without codes (e.g. the fine head of a 32-px generator's 8 styles) is never run
        # for W+ (level 1 still feeds the fuser's features); freezing it spares DDP the same wait.
        for i, n in enumerate(cfg.head_counts[1:], start=2):
            if n == 0:
                getattr(self, f"SS2D_{i}").requires_grad_(False)

    @property
    def feature_adapter(self) -> nn.Module:
        return self.adapt_1

    @staticmethod
    def _vss(block: VSSBlock, x: torch.Tensor) -> torch.Tensor:
        """The block on (B, H, W, C) views of a (B, C, H, W) map; the output in the map's layout
        (a free view when the map is channels-last, as on CPU)."""
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous(memory_format=layout)

    def offsets(self, x: torch.Tensor, features: bool = False):
        pos = self.new_ps(self.averagepooling(self.proj(x)))
        c1, c2, c3 = run_body(self.input_layer, self.body, self.taps, x)
        c2 = _upsample_add(c3, self.latlayer1(c2))
        c2 = c2 + F.interpolate(pos, size=c2.shape[-2:], mode="bilinear", align_corners=False)
        c1 = _upsample_add(c2, self.latlayer2(c1))
        d = self.config.style_dim
        codes, first = [], None
        for i, level in enumerate((c1, c2, c3), start=1):
            head = getattr(self, f"output_layer_{i}")
            if head is None and not (i == 1 and features):
                continue
            out = self._vss(getattr(self, f"SS2D_{i}"), level)
            first = out if i == 1 else first
            if head is not None:
                codes.append(head(out).view(x.shape[0], -1, d))
        return torch.cat(codes, dim=1), (self.adapt_1(first) if features else None)


class GradualStyleBlock(nn.Module):
    """pSp's per-style head: stride-2 convs + LeakyReLU down to 1x1, then an EqualLinear to W."""

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
    """pSp's ``GradualStyleEncoder``: IR-SE + FPN; styles 0-2 from /16, 3-6 from /8, the rest from /4."""

    COARSE, MIDDLE = 3, 7

    def __init__(self, config: EncoderConfig, scan_backend: Backend = "auto"):
        super().__init__(config)
        cfg, dim = config, config.fpn_dim
        self.input_layer = irse_stem(cfg.input_channels, cfg.widths[0])
        self.body, self.taps = irse_body(cfg.widths, cfg.units)
        self.styles = nn.ModuleList(
            [GradualStyleBlock(dim, cfg.style_dim, self._spatial(i)) for i in range(cfg.n_styles)]
        )
        self.latlayer1 = nn.Conv2d(cfg.widths[2], dim, 1)
        self.latlayer2 = nn.Conv2d(cfg.widths[1], dim, 1)

    def _spatial(self, i: int) -> int:
        s = self.config.input_size
        return s // 16 if i < self.COARSE else s // 8 if i < self.MIDDLE else s // 4

    def _backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_body(self.input_layer, self.body, self.taps, x)

    def offsets(self, x: torch.Tensor, features: bool = False):
        c1, c2, c3 = self._backbone(x)
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        maps = [c3 if i < self.COARSE else p2 if i < self.MIDDLE else p1 for i in range(self.n_styles)]
        codes = torch.stack([blk(m) for blk, m in zip(self.styles, maps, strict=True)], dim=1)
        return codes, (p1 if features else None)


class E4EEncoder(PSPEncoder):
    """e4e's ``Encoder4Editing`` at inference: the base code ``styles[0](c3)`` for every style,
    plus ``styles[i]`` of the same FPN level as pSp's as a delta for style i >= 1."""

    def offsets(self, x: torch.Tensor, features: bool = False):
        c1, c2, c3 = self._backbone(x)
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        w0 = self.styles[0](c3)
        maps = [c3 if i < self.COARSE else p2 if i < self.MIDDLE else p1 for i in range(self.n_styles)]
        deltas = [torch.zeros_like(w0)] + [blk(m) for blk, m in zip(self.styles[1:], maps[1:], strict=True)]
        return w0[:, None] + torch.stack(deltas, dim=1), (p1 if features else None)


class ReStyleEncoder(Encoder):
    """ReStyle (``BackboneEncoder``, or ``ProgressiveBackboneEncoder`` for ``restyle_e4e``):
    a 6-channel IR-SE whose every style head reads the final /16 map, run ``n_iters`` times.

    Step 0 encodes (x, the average image) and adds ``latent_avg``; step k encodes (x, the
    reconstruction of the current codes) and adds to them. Reconstructions are the generator's
    output with its stored noise, average-pooled to the input size. The generator is attached
    with :meth:`attach_generator`; it is held outside the state dict (which stays exactly the
    published encoder's keys) but follows ``.to()`` like a submodule.
    """

    def __init__(self, config: EncoderConfig, scan_backend: Backend = "auto"):
        super().__init__(config)
        cfg = config
        self.input_layer = irse_stem(cfg.input_channels, cfg.widths[0])
        self.body, _ = irse_body(cfg.widths, cfg.units)
        spatial = cfg.input_size // 16
        self.styles = nn.ModuleList(
            [GradualStyleBlock(cfg.fpn_dim, cfg.style_dim, spatial) for _ in range(cfg.n_styles)]
        )
        self._generator: list[nn.Module] = []
        self.register_buffer("avg_image", torch.zeros(1, 3, cfg.input_size, cfg.input_size), persistent=False)

    @property
    def progressive(self) -> bool:
        return self.config.arch == "restyle_e4e"

    @property
    def generator(self):
        if not self._generator:
            raise RuntimeError("ReStyle needs its generator: call attach_generator() (load_encoder does)")
        return self._generator[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for g in self._generator:
            g._apply(fn, *args, **kwargs)
        return self

    def attach_generator(self, generator) -> None:
        """Uses ``generator`` for the reconstructions and renders the average image from
        ``latent_avg`` (call after :meth:`set_latent_avg`)."""
        if generator.n_styles != self.n_styles or generator.style_dim != self.config.style_dim:
            raise ValueError(
                f"the generator has {generator.n_styles} styles of {generator.style_dim}; "
                f"this encoder makes {self.n_styles} of {self.config.style_dim}"
            )
        generator.eval().requires_grad_(False)
        self._generator = [generator.to(self.latent_avg.device)]
        with torch.no_grad():
            self.avg_image.copy_(self._render(self.latent_avg[None]))

    def _render(self, codes: torch.Tensor) -> torch.Tensor:
        y = self.generator.synthesis(codes, noise_mode="const")
        return F.adaptive_avg_pool2d(y, self.config.input_size)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.input_layer(fast_layout(x)))
        if not self.progressive:
            return torch.stack([blk(h) for blk in self.styles], dim=1)
        w0 = self.styles[0](h)
        deltas = [torch.zeros_like(w0)] + [blk(h) for blk in self.styles[1:]]
        return w0[:, None] + torch.stack(deltas, dim=1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x: (B, 3, S, S) -> absolute W+ codes, accumulated in the official order (each step's
        output added to the codes so far), so that rounding follows the publisher's."""
        if return_features:
            raise NotImplementedError("ReStyle encoders have no feature map for the fuser")
        self._check_input(x)
        y = self.avg_image.expand(x.shape[0], -1, -1, -1)
        codes = self._step(torch.cat([x, y], dim=1)) + self.latent_avg
        for _ in range(1, self.config.n_iters):
            y = self._render(codes)
            codes = self._step(torch.cat([x, y], dim=1)) + codes
        return codes

    def offsets(self, x: torch.Tensor, features: bool = False):
        return self.forward(x, features) - self.latent_avg, None


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: architecture defaults (n_styles comes from the generator)."""

    name: str
    defaults: dict = field(default_factory=dict)
    description: str = ""


ENCODERS: dict[str, EncoderSpec] = {}
ARCHITECTURES: dict[str, type[Encoder]] = {
    "mambastyle": MambaStyleEncoder,
    "psp": PSPEncoder,
    "e4e": E4EEncoder,
    "restyle_psp": ReStyleEncoder,
    "restyle_e4e": ReStyleEncoder,
}


def register(name: str, description: str, **defaults) -> None:
    """Registers a named configuration; ``defaults['arch']`` picks the architecture."""
    if defaults.get("arch") not in ARCHITECTURES:
        raise ValueError(f"encoder {name!r}: arch must be one of {sorted(ARCHITECTURES)}")
    ENCODERS[name] = EncoderSpec(name, defaults, description)


IRSE50 = (3, 4, 14, 3)
TINY_WIDTHS = {"widths": (16, 32, 64, 64), "units": (1, 1, 2, 1)}

register("mambastyle", "MambaStyle: IR-SE34 + FPN + VSS blocks (the official encoder)", arch="mambastyle")
register(
    "mambastyle_small",
    "half-width MambaStyle for CPU training",
    arch="mambastyle",
    widths=(32, 64, 128, 256),
    units=(2, 2, 3, 2),
    head_pools=((32, 6, 6), (32, 4, 4), (64, 3, 3)),
    patch_pool=12,
)
register(
    "mambastyle_tiny",
    "narrow MambaStyle for the CPU demo and tests",
    arch="mambastyle",
    d_state=8,
    head_pools=((8, 4, 4), (8, 3, 3), (16, 2, 2)),
    patch_pool=6,
    **TINY_WIDTHS,
)
register("psp", "pSp: IR-SE50 + FPN + GradualStyleBlocks", arch="psp", units=IRSE50)
register("psp_tiny", "narrow pSp for tests", arch="psp", **TINY_WIDTHS)
register("e4e", "e4e: pSp's modules, a base code plus per-style deltas", arch="e4e", units=IRSE50)
register("e4e_tiny", "narrow e4e for tests", arch="e4e", **TINY_WIDTHS)
register("restyle_psp", "ReStyle over pSp's backbone encoder (iterative)", arch="restyle_psp", units=IRSE50)
register("restyle_psp_tiny", "narrow ReStyle-pSp for tests", arch="restyle_psp", n_iters=2, **TINY_WIDTHS)
register("restyle_e4e", "ReStyle over e4e's progressive backbone encoder (iterative)", arch="restyle_e4e",
         units=IRSE50)  # fmt: skip
register("restyle_e4e_tiny", "narrow ReStyle-e4e for tests", arch="restyle_e4e", n_iters=2, **TINY_WIDTHS)


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
