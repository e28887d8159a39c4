"""Safe reading and writing of generator and encoder checkpoints.

Generators load from rosinality-format files: a dict holding ``g_ema`` (the state dict)
and optionally ``latent_avg``, as written by that code's ``train.py`` and
``convert_weight.py`` (the published FFHQ checkpoints). pSp/e4e-style files (a
``state_dict`` with ``decoder.``-prefixed keys) and bare state dicts are accepted too.
Files written here add a ``config`` entry (plain types) so the architecture never has
to be guessed.

Everything goes through ``torch.load(..., weights_only=True)``: tensors, plain
containers and numbers only. The single extra allowed type is ``argparse.Namespace``,
which rosinality's training script stores as ``args`` and which carries attributes only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mambastyle.errors import CheckpointError, InvalidConfig
from mambastyle.models.encoders import Encoder, EncoderConfig, build_encoder_from_config
from mambastyle.models.stylegan2 import (
    Generator,
    GeneratorConfig,
    check_state_dict,
    infer_generator_config,
)

PathOrFile = str | os.PathLike | BinaryIO


def _name(src: PathOrFile) -> str:
    return str(src) if isinstance(src, str | os.PathLike) else getattr(src, "name", "<stream>")


def checkpoint_source(uri: str, options=None) -> PathOrFile:
    """What :func:`read_checkpoint` reads for a URI: the path of a local file, or the bytes of
    an S3 object in a named buffer (``options``: the storage module's ``StorageOptions``).

    Raises:
        CheckpointError: the S3 object cannot be read.
    """
    from mambastyle.storage import read_bytes, resolve  # pyarrow only when a URI is resolved

    loc = resolve(uri, options)
    if not loc.is_s3:
        return loc.path
    try:
        data = io.BytesIO(read_bytes(loc))
    except OSError as exc:
        raise CheckpointError(f"{uri}: cannot read ({exc})") from None
    data.name = uri
    return data


def read_checkpoint(src: PathOrFile) -> Any:
    """Loads a checkpoint with ``weights_only=True`` and turns every failure into a clear error.

    Raises:
        CheckpointError: missing file, not a checkpoint, or a pickle that references code.
    """
    name = _name(src)
    if isinstance(src, str | os.PathLike):
        path = Path(src)
        if not path.is_file():
            raise CheckpointError(f"{name}: no such checkpoint file")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{name}: file is empty")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found or "Unsupported global" in str(exc):
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{name}: refused to load: the file references Python code{what}, not just tensors "
                "and plain containers, and could execute it when unpickled. Re-save it as a plain "
                "state dict."
            ) from None
        operand = re.search(r"Unsupported operand \d+", str(exc))
        reason = operand.group(0) if operand else "unreadable pickle"
        raise CheckpointError(f"{name}: not a PyTorch checkpoint ({reason})") from None
    except Exception as exc:  # any other parse failure means the bytes are not a checkpoint
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{name}: not a PyTorch checkpoint ({first})") from None


def _generator_state_dict(ckpt: Any, name: str) -> dict[str, torch.Tensor]:
    """Finds the generator's state dict inside the known checkpoint layouts."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name}: expected a dict with a 'g_ema' entry, got {type(ckpt).__name__}")
    if "g_ema" in ckpt:
        sd = ckpt["g_ema"]
    elif "state_dict" in ckpt and any(str(k).startswith("decoder.") for k in ckpt["state_dict"]):
        sd = {k[len("decoder.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    elif "input.input" in ckpt:
        sd = ckpt
    else:
        keys = ", ".join(map(str, list(ckpt)[:8])) or "none"
        raise CheckpointError(
            f"{name}: no generator found: expected a 'g_ema' entry (top-level keys: {keys})"
        )
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{name}: the generator entry is not a state dict of tensors")
    return dict(sd)


def _latent_avg(value: Any, style_dim: int, name: str) -> torch.Tensor:
    """Accepts a (D,) or (1, D) tensor; anything else is an error."""
    if not isinstance(value, torch.Tensor) or value.numel() != style_dim:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"{name}: latent_avg must be a ({style_dim},) tensor, got {shape}")
    value = value.reshape(style_dim).float()
    if not torch.isfinite(value).all():
        raise CheckpointError(f"{name}: latent_avg contains non-finite values")
    return value


def load_generator(
    src: PathOrFile,
    *,
    resolution: int | None = None,
    latent_avg_samples: int = 10_000,
    device: str | torch.device = "cpu",
) -> Generator:
    """Builds a generator from a checkpoint file.

    Args:
        src: path or binary file object of a rosinality-format (or our own) checkpoint.
        resolution: when given, the checkpoint must be a generator of this resolution.
        latent_avg_samples: size of the fixed-seed sample used to compute ``latent_avg``
            when the checkpoint has none.
        device: where to put the model.

    Raises:
        CheckpointError: unreadable/unsafe file, no generator inside, architecture or key
            mismatch, or a resolution other than the one asked for.
    """
    name = _name(src)
    ckpt = read_checkpoint(src)
    sd = _generator_state_dict(ckpt, name)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    stored = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    try:
        if isinstance(stored, Mapping):
            stored = dict(stored)
            stored["blur_kernel"] = tuple(stored.get("blur_kernel", (1, 3, 3, 1)))
            config = GeneratorConfig(**stored)
        else:
            config = infer_generator_config(sd)
    except (TypeError, InvalidConfig) as exc:
        raise CheckpointError(f"{name}: invalid generator config: {exc}") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    if resolution is not None and resolution != config.resolution:
        raise CheckpointError(
            f"{name}: checkpoint is a {config.resolution}-px generator ({config.n_styles} styles), "
            f"but {resolution} px was asked for"
        )
    model = Generator(config)
    try:
        check_state_dict(model, sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: does not match a {config.resolution}-px generator: {exc}") from None
    model.load_state_dict(sd, strict=True)
    model.to(device).eval().requires_grad_(False)
    if isinstance(ckpt, Mapping) and ckpt.get("latent_avg") is not None:
        model.latent_avg.copy_(_latent_avg(ckpt["latent_avg"], config.style_dim, name))
        model.latent_avg_source = "checkpoint"
    else:
        model.compute_latent_avg(latent_avg_samples)
        model.latent_avg_source = f"computed({latent_avg_samples})"
    return model


def save_generator(model: Generator, dst: str | os.PathLike | BinaryIO) -> None:
    """Writes ``{'g_ema', 'latent_avg', 'config'}``: readable by rosinality-format loaders too.

    Paths are written atomically (temporary file, then rename).
    """
    payload = {
        "g_ema": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
    }
    if not torch.isnan(model.latent_avg).any():
        payload["latent_avg"] = model.latent_avg.detach().cpu().clone()
    _atomic_save(payload, dst)


def _atomic_save(payload: Any, dst: str | os.PathLike | BinaryIO) -> None:
    """torch.save to a file object, or to a path via a temporary file and a rename."""
    if not isinstance(dst, str | os.PathLike):
        torch.save(payload, dst)
        return
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(src: str | os.PathLike | bytes) -> str:
    """Hex sha256 of a file (or of bytes): the identity of a checkpoint in metadata."""
    h = hashlib.sha256()
    if isinstance(src, bytes):
        h.update(src)
        return h.hexdigest()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- encoders

ENCODER_FORMAT = "mambastyle-encoder"
ENCODER_FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def unwrap_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strips DDP/DataParallel ``module.`` and torch.compile ``_orig_mod.`` prefixes."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def encoder_payload(
    encoder: torch.nn.Module,
    *,
    generator: Mapping[str, Any] | None = None,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """The dict an encoder checkpoint holds (plain types and tensors only).

    Args:
        encoder: the encoder, possibly wrapped (DDP, torch.compile): weights are saved unwrapped.
        generator: identity of the generator it was trained against, e.g.
            ``{"sha256": ..., "resolution": 1024, "n_styles": 18}``.
        step: training step.
        extra: more plain-typed entries (optimizer state, RNG state, params) for resuming.
    """
    inner = encoder
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "module", None) or inner._orig_mod
    if not isinstance(inner, Encoder):
        raise TypeError(f"expected an Encoder, got {type(inner).__name__}")
    payload = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_FORMAT_VERSION,
        "config": inner.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap_state_dict(inner.state_dict()).items()},
        "generator": dict(generator or {}),
        "step": int(step),
    }
    return _with_extra(payload, extra)


def _with_extra(payload: dict, extra: Mapping[str, Any] | None) -> dict:
    """``payload`` with the ``extra`` entries added; none may replace a checkpoint field."""
    for key, value in (extra or {}).items():
        if key in payload:
            raise ValueError(f"extra entry {key!r} would overwrite a checkpoint field")
        payload[key] = value
    return payload


def save_encoder(encoder: torch.nn.Module, dst: str | os.PathLike | BinaryIO, **kwargs) -> None:
    """Writes :func:`encoder_payload` (atomically for paths); see there for the arguments."""
    _atomic_save(encoder_payload(encoder, **kwargs), dst)


def load_encoder(src: PathOrFile, *, scan_backend: str = "auto", device: str | torch.device = "cpu"):
    """Rebuilds an encoder from its checkpoint alone (architecture from the stored config).

    A fuser checkpoint gives the encoder it was trained with.

    Returns:
        (encoder in eval mode, the checkpoint dict without its state dict).

    Raises:
        CheckpointError: unreadable/unsafe file, not an encoder checkpoint, unknown format
            version, invalid config, or weights that do not fit the config.
    """
    name = _name(src)
    ckpt = read_checkpoint(src)
    if isinstance(ckpt, Mapping) and ckpt.get("format") == FUSER_FORMAT:  # the encoder a fuser works with
        encoder = _encoder_from(ckpt.get("encoder"), name, scan_backend, device)
        meta = {k: v for k, v in ckpt["encoder"].items() if k != "state_dict"}
        return encoder, {**meta, "format": FUSER_FORMAT}
    encoder = _encoder_from(ckpt, name, scan_backend, device)
    return encoder, {k: v for k, v in ckpt.items() if k != "state_dict"}


def _encoder_from(ckpt: Any, name: str, scan_backend: str, device) -> Encoder:
    """The encoder an encoder checkpoint dict describes (see :func:`load_encoder`)."""
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != ENCODER_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{name}: not a mambastyle encoder checkpoint (format: {found!r})")
    if ckpt.get("version") != ENCODER_FORMAT_VERSION:
        raise CheckpointError(
            f"{name}: encoder checkpoint version {ckpt.get('version')!r} is not supported "
            f"(this mambastyle reads version {ENCODER_FORMAT_VERSION})"
        )
    try:
        config = EncoderConfig.from_dict(dict(ckpt["config"]))
    except (KeyError, TypeError, InvalidConfig) as exc:
        raise CheckpointError(f"{name}: invalid encoder config: {exc}") from None
    encoder = build_encoder_from_config(config, scan_backend=scan_backend)
    sd = unwrap_state_dict(ckpt.get("state_dict") or {})
    try:
        check_state_dict(encoder, sd)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{name}: weights do not match the stored {config.arch} config: {exc}"
        ) from None
    encoder.load_state_dict(sd, strict=True)
    return encoder.to(device).eval()


FUSER_FORMAT = "mambastyle-fuser"
FUSER_FORMAT_VERSION = 1


def fuser_payload(
    encoder: torch.nn.Module,
    fuser: torch.nn.Module,
    *,
    generator: Mapping[str, Any] | None = None,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """The dict a fuser checkpoint holds: the encoder it works with (a whole encoder checkpoint)
    and the fuser (config + unwrapped weights), the generator identity and the step."""
    from mambastyle.models.fuser import Fuser

    if not isinstance(fuser, Fuser):
        raise TypeError(f"expected a Fuser, got {type(fuser).__name__}")
    payload = {
        "format": FUSER_FORMAT,
        "version": FUSER_FORMAT_VERSION,
        "encoder": encoder_payload(encoder, generator=generator, step=step),
        "fuser": {
            "config": fuser.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in unwrap_state_dict(fuser.state_dict()).items()},
        },
        "generator": dict(generator or {}),
        "step": int(step),
    }
    return _with_extra(payload, extra)


def load_fuser(src: PathOrFile, *, scan_backend: str = "auto", device: str | torch.device = "cpu"):
    """Rebuilds the encoder and the fuser of a fuser checkpoint from the file alone.

    Returns:
        (encoder, fuser, the checkpoint dict without weights), both modules in eval mode.

    Raises:
        CheckpointError: unreadable/unsafe file, not a fuser checkpoint, unknown version,
            invalid configs, weights that do not fit, or an encoder and fuser that do not fit
            each other.
    """
    from mambastyle.models.fuser import FuserConfig, build_fuser_from_config

    name = _name(src)
    ckpt = read_checkpoint(src)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FUSER_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{name}: not a mambastyle fuser checkpoint (format: {found!r})")
    if ckpt.get("version") != FUSER_FORMAT_VERSION:
        raise CheckpointError(f"{name}: fuser checkpoint version {ckpt.get('version')!r} is not supported")
    encoder = _encoder_from(ckpt.get("encoder"), f"{name} (encoder)", scan_backend, device)
    part = ckpt.get("fuser") or {}
    try:
        config = FuserConfig.from_dict(dict(part["config"]))
    except (KeyError, TypeError, InvalidConfig) as exc:
        raise CheckpointError(f"{name}: invalid fuser config: {exc}") from None
    enc = encoder.config
    if (config.in_channels, config.feature_size, config.n_styles, config.style_dim) != (
        enc.fpn_dim,
        enc.input_size // 4,
        enc.n_styles,
        enc.style_dim,
    ):
        raise CheckpointError(f"{name}: the fuser does not fit its encoder's features or codes")
    fuser = build_fuser_from_config(config, scan_backend=scan_backend)
    sd = unwrap_state_dict(part.get("state_dict") or {})
    check_state_dict(fuser, sd)
    fuser.load_state_dict(sd, strict=True)
    meta = {k: v for k, v in ckpt.items() if k not in ("encoder", "fuser")}
    meta["encoder"] = {k: v for k, v in ckpt["encoder"].items() if k != "state_dict"}
    meta["fuser"] = {"config": config.to_dict()}
    return encoder, fuser.to(device).eval(), meta


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, values) in name order.

    The identity of a generator independent of the file it came from: two loads of the
    same weights (or the same seeded random init) agree; any changed weight does not.
    """
    h = hashlib.sha256()
    for name, value in sorted(unwrap_state_dict(module.state_dict()).items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    latent_avg = getattr(module, "latent_avg", None)
    if isinstance(latent_avg, torch.Tensor):  # non-persistent in the generator, but part of its identity
        h.update(b"latent_avg|" + latent_avg.detach().cpu().double().numpy().tobytes())
    return h.hexdigest()
