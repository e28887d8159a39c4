"""StyleGAN2 generator (mapping + synthesis) compatible with rosinality-format state dicts.

Module and parameter names follow rosinality/stylegan2-pytorch exactly, so a ``g_ema``
state dict from that code (or from its TF-converted FFHQ checkpoints) loads unchanged:
``style.{1..n_mlp}``, ``input.input``, ``conv1``, ``to_rgb1``, ``convs.{i}``, ``to_rgbs.{i}``
and the ``noises.noise_{i}`` buffers. All ops are native PyTorch (see
:mod:`mambastyle.layers`): nothing is compiled, at import or ever, so the generator runs
on any CPU or GPU.

The generator is one module, its layers kept beside it, because rosinality's key layout
ties them together; hence its length.

Naming: ``Equal*`` layers use the equalized learning rate (weights stored at unit
variance, scaled at run time). Shapes: B batch, C channels, D style dim (512),
S = n_styles = 2 * log2(resolution) - 2 per-layer codes of W+.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.errors import CheckpointError, InvalidConfig, check_at_least
from mambastyle.layers import fused_leaky_relu, make_kernel, upfirdn2d

NoiseMode = Literal["const", "random", "none"]
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a StyleGAN2 generator; saved beside the weights.

    Channels per resolution follow rosinality's table (512 up to 32 px, then
    ``16384 * channel_multiplier / res``), capped at ``channel_max``; a small cap gives
    the narrow configurations used on CPU and in tests.
    """

    resolution: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channel_max: int = 512
    lr_mlp: float = 0.01
    blur_kernel: tuple[int, ...] = field(default=(1, 3, 3, 1))

    def __post_init__(self) -> None:
        r = self.resolution
        if not (MIN_RESOLUTION <= r <= MAX_RESOLUTION and r & (r - 1) == 0):
            raise InvalidConfig(
                "resolution",
                f"must be a power of two between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {r}",
            )
        check_at_least(self, 1, "style_dim", "n_mlp", "channel_multiplier", "channel_max")
        if self.lr_mlp <= 0:
            raise InvalidConfig("lr_mlp", f"must be > 0, got {self.lr_mlp}")
        object.__setattr__(self, "blur_kernel", tuple(int(k) for k in self.blur_kernel))
        if len(self.blur_kernel) < 2 or sum(self.blur_kernel) == 0:
            raise InvalidConfig("blur_kernel", f"needs >= 2 taps with a non-zero sum, got {self.blur_kernel}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    @property
    def n_styles(self) -> int:
        """Number of per-layer style codes in W+ (18 at 1024 px, 14 at 256 px)."""
        return 2 * self.log_size - 2

    @property
    def num_noise_layers(self) -> int:
        return 2 * (self.log_size - 2) + 1

    def channels(self, res: int) -> int:
        """Feature channels of the block at spatial resolution ``res``."""
        base = 512 if res <= 32 else 16384 * self.channel_multiplier // res
        return min(self.channel_max, base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blur_kernel"] = list(self.blur_kernel)
        return d


# --------------------------------------------------------------------------- layers


class PixelNorm(nn.Module):
    """Normalises each vector to unit root-mean-square over dimension 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate and optional fused leaky ReLU."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class FusedLeakyReLU(nn.Module):
    """Learned per-channel bias followed by leaky ReLU with gain sqrt(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    """Low-pass FIR filter applied after a strided transposed convolution."""

    def __init__(self, kernel: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling (used on the RGB skip branch)."""

    def __init__(self, kernel: Sequence[int], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution with optional demodulation and 2x upsampling.

    Two formulations of the same function: :meth:`forward_shared` modulates the input
    activations and convolves the whole batch with one shared weight (fast for batches);
    :meth:`forward_grouped` builds one modulated weight per sample and runs a grouped
    convolution (the literal definition; cheapest for a single sample, where it is a
    plain convolution). :meth:`forward` picks by batch size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.padding = kernel_size // 2
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)

    def _demod(self, s: torch.Tensor) -> torch.Tensor:
        """(B, in) styles -> (B, out) demodulation coefficients."""
        w2 = (self.scale * self.weight[0]).pow(2).sum([2, 3])  # (out, in)
        return torch.rsqrt(s.pow(2) @ w2.t() + 1e-8)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x: (B, in, H, W), style: (B, D) -> (B, out, H', W'), H' = 2H when upsampling."""
        if x.shape[0] == 1:
            return self.forward_grouped(x, style)
        return self.forward_shared(x, style)

    def forward_shared(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Batched formulation: scale activations, shared convolution, scale outputs."""
        s = self.modulation(style)  # (B, in)
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        x = x * s[:, :, None, None]
        if self.upsample:
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        else:
            x = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            x = x * self._demod(s)[:, :, None, None]
        # The blur is linear per channel, so it commutes with the demodulation scaling.
        return self.blur(x) if self.upsample else x

    def forward_grouped(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Reference formulation: one modulated weight per sample, grouped convolution."""
        b, c, h, w = x.shape
        s = self.modulation(style).view(b, 1, c, 1, 1)
        weight = self.scale * self.weight * s  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, -1, 1, 1, 1)
        k = self.kernel_size
        x = x.reshape(1, b * c, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * c, self.out_channels, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=b)
            out = self.blur(out.view(b, self.out_channels, *out.shape[-2:]))
        else:
            weight = weight.view(b * self.out_channels, c, k, k)
            out = F.conv2d(x, weight, padding=self.padding, groups=b)
            out = out.view(b, self.out_channels, *out.shape[-2:])
        return out


class NoiseInjection(nn.Module):
    """Adds per-pixel noise scaled by a learned scalar."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return x if noise is None else x + self.weight * noise


class ConstantInput(nn.Module):
    """The learned 4x4 input tensor of the synthesis network."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv -> noise -> bias + leaky ReLU."""

    def __init__(
        self, in_channels, out_channels, kernel_size, style_dim, upsample=False, blur_kernel=(1, 3, 3, 1)
    ):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channels, out_channels, kernel_size, style_dim, upsample=upsample, blur_kernel=blur_kernel
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB, added to the upsampled RGB skip from the block below."""

    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# --------------------------------------------------------------------------- generator


class Generator(nn.Module):
    """StyleGAN2 generator: ``mapping`` (Z -> W) and ``synthesis`` (W+ -> image).

    ``latent_avg`` (D,) is a non-persistent buffer, so ``state_dict()`` keeps rosinality's
    ``g_ema`` layout exactly; checkpoints store it beside ``g_ema`` (see
    :mod:`mambastyle.checkpoints`). It is NaN until set or computed.
    """

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = cfg = config
        blur = cfg.blur_kernel
        layers: list[nn.Module] = [PixelNorm()]
        layers += [
            EqualLinear(cfg.style_dim, cfg.style_dim, lr_mul=cfg.lr_mlp, activation=True)
            for _ in range(cfg.n_mlp)
        ]
        self.style = nn.Sequential(*layers)

        self.input = ConstantInput(cfg.channels(4))
        self.conv1 = StyledConv(cfg.channels(4), cfg.channels(4), 3, cfg.style_dim, blur_kernel=blur)
        self.to_rgb1 = ToRGB(cfg.channels(4), cfg.style_dim, upsample=False)

        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(cfg.num_noise_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        in_ch = cfg.channels(4)
        for log_res in range(3, cfg.log_size + 1):
            out_ch = cfg.channels(2**log_res)
            self.convs.append(StyledConv(in_ch, out_ch, 3, cfg.style_dim, upsample=True, blur_kernel=blur))
            self.convs.append(StyledConv(out_ch, out_ch, 3, cfg.style_dim, blur_kernel=blur))
            self.to_rgbs.append(ToRGB(out_ch, cfg.style_dim, blur_kernel=blur))
            in_ch = out_ch
        self.register_buffer("latent_avg", torch.full((cfg.style_dim,), float("nan")), persistent=False)

    @property
    def n_styles(self) -> int:
        return self.config.n_styles

    @property
    def style_dim(self) -> int:
        return self.config.style_dim

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """z: (B, D) -> w: (B, D), optionally truncated towards ``latent_avg``."""
        w = self.style(z)
        return w if truncation_psi == 1.0 else self.truncate(w, truncation_psi)

    def truncate(self, w: torch.Tensor, psi: float) -> torch.Tensor:
        """Interpolates W or W+ codes ((B, D) or (B, S, D)) towards ``latent_avg``."""
        avg = self.latent_avg
        if torch.isnan(avg).any():
            raise RuntimeError(
                "latent_avg is not set; load it from a checkpoint or call compute_latent_avg()"
            )
        return avg + psi * (w - avg)

    def style_codes(self, w_plus: torch.Tensor) -> torch.Tensor:
        """The per-layer modulation styles the synthesis network computes from W+ codes,
        concatenated: (B, sum of modulated input channels), the "style space" (S).

        Only these affine projections of W+ reach the image, so at layers narrower than
        ``style_dim`` part of each code is invisible; latent recovery is judged here.
        """
        layers = [(self.conv1, 0), (self.to_rgb1, 1)]
        for j, (conv_up, conv, to_rgb) in enumerate(
            zip(self.convs[::2], self.convs[1::2], self.to_rgbs, strict=True)
        ):
            i = 1 + 2 * j
            layers += [(conv_up, i), (conv, i + 1), (to_rgb, i + 2)]
        return torch.cat([layer.conv.modulation(w_plus[:, i]) for layer, i in layers], dim=1)

    @torch.no_grad()
    def compute_latent_avg(self, n_samples: int = 10_000, seed: int = 0, chunk: int = 4096) -> torch.Tensor:
        """Sets ``latent_avg`` to the mean of ``mapping(z)`` over a fixed-seed sample of Z.

        Deterministic for given weights: z is drawn on the CPU from ``seed``, the mean is
        accumulated in float64.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(self.style_dim, dtype=torch.float64)
        for start in range(0, n_samples, chunk):
            n = min(chunk, n_samples - start)
            z = torch.randn(n, self.style_dim, generator=gen).to(self.latent_avg.device)
            total += self.style(z).double().sum(0).cpu()
        self.latent_avg.copy_((total / n_samples).to(self.latent_avg.dtype))
        return self.latent_avg

    def make_noise(
        self, batch: int, mode: NoiseMode, generator: torch.Generator | None = None
    ) -> list[torch.Tensor | None]:
        """Per-layer noise maps: the stored buffers (``const``), fresh N(0, 1) (``random``), or none."""
        if mode == "const":
            return [getattr(self.noises, f"noise_{i}") for i in range(self.config.num_noise_layers)]
        if mode == "none":
            return [None] * self.config.num_noise_layers
        if mode == "random":
            dev = self.latent_avg.device
            out = []
            for i in range(self.config.num_noise_layers):
                res = 2 ** ((i + 5) // 2)
                out.append(torch.randn(batch, 1, res, res, generator=generator, device="cpu").to(dev))
            return out
        raise ValueError(f"noise mode must be 'const', 'random' or 'none', got {mode!r}")

    def synthesis(
        self,
        w_plus: torch.Tensor,
        noise_mode: NoiseMode = "const",
        noise: Sequence[torch.Tensor | None] | None = None,
        generator: torch.Generator | None = None,
        feature_offset: tuple[int, torch.Tensor] | None = None,
        return_features_at: int | None = None,
    ):
        """Renders images from W+ codes.

        Args:
            w_plus: (B, S, D) per-layer codes, S = ``n_styles``.
            noise_mode: ``const`` (the stored noise buffers; deterministic), ``random``
                (fresh noise from ``generator``) or ``none`` (no noise).
            noise: explicit per-layer noise maps (overrides ``noise_mode``).
            generator: RNG for ``noise_mode='random'``.
            feature_offset: ``(res, delta)`` adds ``delta`` (B or 1, C_res, res, res) to the
                features after the last convolution at resolution ``res``, before its ToRGB;
                a zero tensor leaves the output unchanged.
            return_features_at: also return the generator's own features at this resolution
                (after its last convolution there, before any ``feature_offset``).

        Returns:
            (B, 3, R, R) images, nominally in [-1, 1]; with ``return_features_at``, the pair
            (images, (B, C_res, res, res) features).
        """
        cfg = self.config
        if w_plus.ndim != 3 or w_plus.shape[1:] != (cfg.n_styles, cfg.style_dim):
            raise ValueError(
                f"w_plus must be (B, {cfg.n_styles}, {cfg.style_dim}) for a {cfg.resolution}-px "
                f"generator, got {tuple(w_plus.shape)}"
            )
        b = w_plus.shape[0]
        if noise is None:
            noise = self.make_noise(b, noise_mode, generator)
        elif len(noise) != cfg.num_noise_layers:
            raise ValueError(f"expected {cfg.num_noise_layers} noise maps, got {len(noise)}")
        inject_res, inject = feature_offset if feature_offset is not None else (None, None)
        blocks = {2**i for i in range(2, cfg.log_size + 1)}
        for name, res_ in (("feature_offset", inject_res), ("return_features_at", return_features_at)):
            if res_ is not None and res_ not in blocks:
                raise ValueError(
                    f"{name} resolution {res_} is not a block of a {cfg.resolution}-px generator"
                )
        features = None

        out = self.conv1(self.input(b), w_plus[:, 0], noise[0])  # (B, C4, 4, 4)
        if return_features_at == 4:
            features = out
        if inject_res == 4:
            out = out + inject
        skip = self.to_rgb1(out, w_plus[:, 1])  # (B, 3, 4, 4)
        i, res = 1, 4
        for conv_up, conv, to_rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs, strict=True):
            res *= 2
            out = conv_up(out, w_plus[:, i], noise[i])  # (B, C, res, res)
            out = conv(out, w_plus[:, i + 1], noise[i + 1])
            if return_features_at == res:
                features = out
            if inject_res == res:
                out = out + inject
            skip = to_rgb(out, w_plus[:, i + 2], skip)  # (B, 3, res, res)
            i += 2
        return skip if return_features_at is None else (skip, features)

    def forward(
        self,
        z: torch.Tensor,
        truncation_psi: float = 1.0,
        noise_mode: NoiseMode = "const",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """z: (B, D) -> (B, 3, R, R): mapping, broadcast to W+, synthesis."""
        w = self.mapping(z, truncation_psi)
        w_plus = w[:, None, :].expand(-1, self.n_styles, -1)
        return self.synthesis(w_plus, noise_mode=noise_mode, generator=generator)


# --------------------------------------------------------------------------- state dicts


def build_generator(config: GeneratorConfig, seed: int = 0) -> Generator:
    """Builds a randomly initialised generator, identical for identical (config, seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(config)


def infer_generator_config(state_dict: Mapping[str, torch.Tensor], lr_mlp: float = 0.01) -> GeneratorConfig:
    """Recovers the architecture of a rosinality ``g_ema`` state dict from its key names and shapes.

    Raises:
        CheckpointError: when the keys do not describe a StyleGAN2 generator.
    """
    required = ("input.input", "conv1.conv.weight", "style.1.weight", "to_rgb1.conv.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        some = ", ".join(sorted(state_dict)[:5]) or "none"
        raise CheckpointError(
            f"not a StyleGAN2 generator state dict: missing {', '.join(missing)} (first keys: {some})"
        )
    n_mlp = sum(1 for k in state_dict if k.startswith("style.") and k.endswith(".weight"))
    style_dim = int(state_dict["style.1.weight"].shape[1])
    n_rgbs = sum(1 for k in state_dict if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
    resolution = 2 ** (n_rgbs + 2)
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise CheckpointError(
            f"state dict has {n_rgbs} to_rgbs blocks ({resolution} px), outside the supported range"
        )
    chans = {4: int(state_dict["input.input"].shape[1])}
    for j in range(n_rgbs):
        key = f"convs.{2 * j}.conv.weight"
        if key not in state_dict:
            raise CheckpointError(f"state dict has to_rgbs.{j} but no {key}")
        chans[2 ** (j + 3)] = int(state_dict[key].shape[1])
    channel_max = max(chans.values())
    # The multiplier only shows where the table drops below the cap (>= 64 px).
    candidates = [chans[r] * r // 16384 for r in chans if r >= 64 and chans[r] < channel_max] or [2]
    blur = _blur_taps(state_dict)
    for cm in dict.fromkeys(candidates):
        if cm < 1:
            continue
        cfg = GeneratorConfig(resolution, style_dim, n_mlp, cm, channel_max, lr_mlp, blur)
        if all(cfg.channels(r) == c for r, c in chans.items()):
            return cfg
    raise CheckpointError(f"channel widths per resolution {chans} match no StyleGAN2 channel table")


def _blur_taps(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The 1-D blur taps stored in the first upsampling conv's buffer (default [1, 3, 3, 1])."""
    k = state_dict.get("convs.0.conv.blur.kernel")
    if k is None:
        return (1, 3, 3, 1)
    row = k[0].double()
    row = row / row[row > 0].min()
    taps = tuple(int(round(float(v))) for v in row)
    if torch.allclose(make_kernel(taps).double() * 4, k.double(), atol=1e-6):
        return taps
    raise CheckpointError("convs.0.conv.blur.kernel is not a separable integer FIR kernel")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raises a CheckpointError naming missing, unexpected and mis-shaped keys (first few of each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", shapes),
    ):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError("; ".join(problems))
