"""Safe reading and writing of generator and encoder checkpoints.

Generators load from rosinality-format files: a dict holding ``g_ema`` (the state dict)
and optionally ``latent_avg``, as written by that code's ``train.py`` and
``convert_weight.py`` (the published FFHQ checkpoints). pSp/e4e-style files (a
``state_dict`` with ``decoder.``-prefixed keys) and bare state dicts are accepted too.
Files written here add a ``config`` entry (plain types) so the architecture never has
to be guessed.

One module for every checkpoint layout the project reads (its own generator, encoder and fuser
files, rosinality's generators, the official pSp / e4e / ReStyle / MambaStyle training files),
so :func:`load_encoder` dispatches across them in one place; hence its length.

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
from mambastyle.models.encoders import Encoder, EncoderConfig, build_encoder_from_config, on_device
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
    """Accepts (D,), (1, D), or one identical row per style ((S, D), as pSp-family files store
    the generator's average repeated); anything else is an error."""
    if not isinstance(value, torch.Tensor) or value.numel() % style_dim or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"{name}: latent_avg must be a ({style_dim},) tensor, got {shape}")
    rows = value.detach().reshape(-1, style_dim).float()
    if not torch.isfinite(rows).all():
        raise CheckpointError(f"{name}: latent_avg contains non-finite values")
    if not torch.equal(rows, rows[:1].expand_as(rows)):
        raise CheckpointError(
            f"{name}: latent_avg has {rows.shape[0]} different rows, so it is not one average W "
            f"of the generator"
        )
    return rows[0].clone()


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
    stored = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    latent_avg = ckpt.get("latent_avg") if isinstance(ckpt, Mapping) else None
    model = load_generator_state(sd, name, latent_avg, stored, resolution, latent_avg_samples)
    return model.to(device)


def load_generator_state(
    sd: Mapping[str, torch.Tensor],
    name: str,
    latent_avg: Any = None,
    stored_config: Any = None,
    resolution: int | None = None,
    latent_avg_samples: int = 10_000,
) -> Generator:
    """A frozen CPU generator from a rosinality-layout state dict (architecture from
    ``stored_config`` or inferred from the keys), with ``latent_avg`` when given, else the
    mean mapping of a fixed-seed sample. See :func:`load_generator`."""
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{name}: the generator entry is not a state dict of tensors")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    try:
        if isinstance(stored_config, Mapping):
            stored = dict(stored_config)
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
    model.eval().requires_grad_(False)
    if latent_avg is not None:
        model.latent_avg.copy_(_latent_avg(latent_avg, config.style_dim, name))
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
# 2: the published module layouts; ``latent_avg`` is an entry of its own, not a weight.
ENCODER_FORMAT_VERSION = 2
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


def _unwrap_module(encoder: torch.nn.Module) -> torch.nn.Module:
    inner = encoder
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "module", None) or inner._orig_mod
    return inner


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
    from mambastyle.models.encoders import ReStyleEncoder

    inner = _unwrap_module(encoder)
    if not isinstance(inner, Encoder) or not isinstance(inner.config, EncoderConfig):
        raise TypeError(f"expected an Encoder of a registered architecture, got {type(inner).__name__}")
    if isinstance(inner, ReStyleEncoder):
        raise TypeError("ReStyle encoders run their generator in the loop; load their official files instead")
    payload = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_FORMAT_VERSION,
        "config": inner.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap_state_dict(inner.state_dict()).items()},
        "latent_avg": inner.latent_avg.detach().cpu().clone(),
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


def load_encoder(
    src: PathOrFile,
    *,
    scan_backend: str = "auto",
    device: str | torch.device = "cpu",
    n_iters: int | None = None,
):
    """Rebuilds an encoder from its checkpoint alone.

    Reads this project's encoder and fuser checkpoints (a fuser checkpoint gives the encoder it
    was trained with) and the files the official training scripts of pSp, e4e, ReStyle and
    MambaStyle save (see :func:`official_layout`). The encoder maps (B, 3, S, S) images in
    [-1, 1] to absolute W+ codes as its publisher's inference computes them.

    Args:
        n_iters: ReStyle only: refinement steps (default: the official inference's 5).

    Returns:
        (encoder in eval mode, the checkpoint's metadata: everything but weights; for official
        files ``layout``, ``opts`` and ``generator``, the identity of the decoder inside).

    Raises:
        CheckpointError: unreadable/unsafe file, unknown layout or format version, invalid
            config, or weights that do not fit the architecture.
    """
    name = _name(src)
    ckpt = read_checkpoint(src)
    if isinstance(ckpt, Mapping) and ckpt.get("format") == FUSER_FORMAT:  # the encoder a fuser works with
        encoder = _encoder_from(ckpt.get("encoder"), name, scan_backend, device)
        meta = {k: v for k, v in ckpt["encoder"].items() if k not in ("state_dict", "latent_avg")}
        return encoder, {**meta, "format": FUSER_FORMAT}
    if isinstance(ckpt, Mapping) and "format" not in ckpt and official_layout(ckpt, name) is not None:
        return _official_encoder(ckpt, name, scan_backend, device, n_iters)
    encoder = _encoder_from(ckpt, name, scan_backend, device)
    return encoder, {k: v for k, v in ckpt.items() if k not in ("state_dict", "latent_avg")}


def _encoder_from(ckpt: Any, name: str, scan_backend: str, device) -> Encoder:
    """The encoder one of this project's encoder checkpoint dicts describes."""
    from mambastyle.models.encoders_v1 import build_v1_encoder, v1_state_dict

    if not isinstance(ckpt, Mapping) or ckpt.get("format") != ENCODER_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        keys = ", ".join(map(str, list(ckpt)[:8])) if isinstance(ckpt, Mapping) else ""
        raise CheckpointError(
            f"{name}: unknown checkpoint layout (format: {found!r}; top-level keys: {keys or 'none'}): "
            "expected a mambastyle encoder or fuser checkpoint, or a pSp, e4e, ReStyle or MambaStyle "
            "training checkpoint ('state_dict' with 'encoder.*' and 'decoder.*' weights, and 'opts')"
        )
    version = ckpt.get("version")
    if version not in (1, ENCODER_FORMAT_VERSION):
        raise CheckpointError(
            f"{name}: encoder checkpoint version {version!r} is not supported "
            f"(this mambastyle reads versions 1 to {ENCODER_FORMAT_VERSION})"
        )
    sd = unwrap_state_dict(ckpt.get("state_dict") or {})
    latent_avg = ckpt.get("latent_avg")
    try:
        if version == 1:  # the layouts before the published ones; see models/encoders_v1.py
            encoder = build_v1_encoder(dict(ckpt["config"]), scan_backend=scan_backend)
            sd, latent_avg = v1_state_dict(sd)
        else:
            encoder = build_encoder_from_config(EncoderConfig.from_dict(dict(ckpt["config"])), scan_backend)
    except (KeyError, TypeError, InvalidConfig) as exc:
        raise CheckpointError(f"{name}: invalid encoder config: {exc}") from None
    _load_strict(encoder, sd, f"{name}: weights do not match the stored {encoder.config.arch} config")
    if latent_avg is not None:
        _set_latent_avg(encoder, latent_avg, name)
    return on_device(encoder, device).eval()


def _load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{what}: the state dict holds values that are not tensors")
    try:
        check_state_dict(module, sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    module.load_state_dict(sd, strict=True)


def _set_latent_avg(encoder: Encoder, value: Any, name: str) -> None:
    if not isinstance(value, torch.Tensor) or not torch.isfinite(value).all():
        raise CheckpointError(f"{name}: latent_avg is not a finite tensor")
    try:
        encoder.set_latent_avg(value.float())
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from None


# --------------------------------------------------------------------------- official files

# opts['encoder_type'] -> our architecture, as each training script names its encoder class.
OFFICIAL_ENCODER_TYPES = {
    "GradualStyleEncoder": "psp",
    "Encoder4Editing": "e4e",
    "BackboneEncoder": "restyle_psp",
    "ProgressiveBackboneEncoder": "restyle_e4e",
}
_MAMBA_HEAD_POOLS = ((64, 9, 9), (64, 6, 6), (128, 5, 5))  # fixed in MambaStyle's heads


def _official_arch(kind: str, enc_sd: Mapping[str, torch.Tensor], name: str) -> dict:
    """Backbone widths and units per stage (IR-SE50 or IR-SE34 in the published files) read off
    the weights, and for MambaStyle the scan's state size and expansion."""
    depths, i = [], 0
    while f"body.{i}.res_layer.1.weight" in enc_sd:
        depths.append(int(enc_sd[f"body.{i}.res_layer.1.weight"].shape[0]))
        i += 1
    widths: list[int] = []
    units: list[int] = []
    for d in depths:
        if widths and d == widths[-1]:
            units[-1] += 1
        else:
            widths.append(d)
            units.append(1)
    if len(widths) != 4:
        raise CheckpointError(
            f"{name}: the encoder.body weights describe {len(widths)} IR-SE stages (widths {widths}), not 4"
        )
    arch: dict[str, Any] = {"widths": tuple(widths), "units": tuple(units)}
    if kind == "mambastyle":
        try:
            a_logs = enc_sd["SS2D_1.self_attention.A_logs"]
            in_proj = enc_sd["SS2D_1.self_attention.in_proj.weight"]
        except KeyError as exc:
            raise CheckpointError(f"{name}: MambaStyle encoder without {exc.args[0]}") from None
        arch["d_state"] = int(a_logs.shape[-1])
        arch["expand"] = in_proj.shape[0] / 2 / in_proj.shape[1]
        arch["head_pools"] = _MAMBA_HEAD_POOLS
    return arch


def _prefixed(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}


def _opts_dict(ckpt: Mapping, name: str) -> dict:
    opts = ckpt.get("opts")
    if opts is None:
        return {}
    if isinstance(opts, argparse.Namespace):  # unpickled attribute by attribute, never called
        opts = vars(opts)
    if not isinstance(opts, Mapping):
        raise CheckpointError(f"{name}: 'opts' is a {type(opts).__name__}, not a dict of options")
    return dict(opts)


def official_layout(ckpt: Mapping, name: str = "checkpoint") -> str | None:
    """The architecture of an official training checkpoint (``psp``, ``e4e``, ``restyle_psp``,
    ``restyle_e4e``, ``mambastyle``), or None when ``ckpt`` is not one (no ``state_dict`` with
    ``encoder.*`` weights).

    MambaStyle is told by its VSS blocks; the IR-SE50 families need ``opts['encoder_type']``:
    pSp and e4e (and ReStyle's two variants) have identical weights and differ in the forward.

    Raises:
        CheckpointError: an encoder type this project does not implement, or no way to tell.
    """
    sd = ckpt.get("state_dict")
    if not isinstance(sd, Mapping):
        return None
    enc = _prefixed(unwrap_state_dict(sd), "encoder.")
    if not enc:
        return None
    if any(k.startswith("SS2D_1.") for k in enc):
        return "mambastyle"
    opts = _opts_dict(ckpt, name)
    kind = opts.get("encoder_type")
    if kind in OFFICIAL_ENCODER_TYPES:
        return OFFICIAL_ENCODER_TYPES[kind]
    if kind is not None:
        raise CheckpointError(
            f"{name}: encoder_type {kind!r} is not supported; supported: "
            f"{', '.join(sorted(OFFICIAL_ENCODER_TYPES))} and MambaStyle's encoder"
        )
    raise CheckpointError(
        f"{name}: has encoder.* weights but no opts['encoder_type'], and pSp, e4e and ReStyle files "
        "cannot be told apart by their weights alone; use the file as its training script saved it"
    )


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict only (not its ``latent_avg``): the identity of a
    generator's weights, shared by a decoder inside an encoder file and the same generator
    saved on its own (whose stored average may come from another sample)."""
    return _state_hash(module, with_latent_avg=False)


def _official_encoder(ckpt: Mapping, name: str, scan_backend: str, device, n_iters: int | None):
    """Encoder, metadata of an official training checkpoint (see :func:`load_encoder`)."""
    from mambastyle.models.encoders import n_styles_for

    kind = official_layout(ckpt, name)
    opts = _opts_dict(ckpt, name)
    sd = unwrap_state_dict(ckpt["state_dict"])
    enc_sd = _prefixed(sd, "encoder.")
    dec_sd = _prefixed(sd, "decoder.")
    if not dec_sd:
        raise CheckpointError(f"{name}: a {kind} checkpoint without decoder.* weights (its generator)")
    generator = load_generator_state(dec_sd, f"{name} (decoder)", ckpt.get("latent_avg"))
    resolution = generator.resolution
    size = opts.get("stylegan_size" if kind == "e4e" else "output_size")
    if size is not None and size != resolution:
        raise CheckpointError(f"{name}: opts say a {size}-px generator, but the decoder is {resolution} px")
    dataset = str(opts.get("dataset_type") or "")
    counts = None
    if kind == "mambastyle" and "car" in dataset:  # Backbone_Mamba_cars: 4 + 4 + 8 codes
        counts = (4, 4, 8)
        if generator.n_styles != 16:
            raise CheckpointError(f"{name}: MambaStyle's cars encoder makes 16 codes, the decoder takes "
                                  f"{generator.n_styles}")  # fmt: skip
    if kind.startswith("restyle") and "car" in dataset:
        raise CheckpointError(f"{name}: ReStyle's cars models (cropped 384x512 images) are not supported")
    input_nc = opts.get("input_nc")
    expected_nc = 6 if kind.startswith("restyle") else 3
    if input_nc not in (None, expected_nc) or opts.get("label_nc") not in (None, 0):
        raise CheckpointError(
            f"{name}: a {kind} encoder of {input_nc} input channels (label_nc {opts.get('label_nc')}) "
            f"does not invert RGB images; expected {expected_nc}"
        )
    steps = n_iters if n_iters is not None else 5  # the official iterative inference's default
    try:
        config = EncoderConfig(
            arch=kind,
            n_styles=n_styles_for(resolution),
            style_dim=generator.style_dim,
            style_counts=counts,
            n_iters=steps,
            **_official_arch(kind, enc_sd, name),
        )
    except InvalidConfig as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    encoder = build_encoder_from_config(config, scan_backend=scan_backend)
    _load_strict(encoder, enc_sd, f"{name}: the encoder.* weights do not fit the official {kind} encoder")
    latent_avg = ckpt.get("latent_avg")
    if kind.startswith("restyle"):
        start = True  # every ReStyle step 0 starts from the average code
    else:
        start = bool(opts.get("start_from_latent_avg", latent_avg is not None))
    if start:
        if latent_avg is not None:
            _set_latent_avg(encoder, latent_avg, name)
        elif kind == "e4e":  # e4e's own loader averages the mapping of random z then
            encoder.set_latent_avg(generator.latent_avg)
        else:
            raise CheckpointError(f"{name}: opts ask to add latent_avg, but the file has none")
    if kind.startswith("restyle"):
        encoder.attach_generator(generator)
    meta = {
        "format": f"official-{kind}",
        "layout": kind,
        "opts": {k: v for k, v in opts.items() if isinstance(v, str | int | float | bool | type(None))},
        "generator": {
            "resolution": resolution,
            "n_styles": generator.n_styles,
            "weights_sha256": weights_sha256(generator),
            "source": name,
        },
        "adds_latent_avg": start,
        "step": int(ckpt.get("global_step") or 0),
        "ignored": sorted({k.split(".", 1)[0] for k in sd if not k.startswith(("encoder.", "decoder."))}),
    }
    return on_device(encoder, device).eval(), meta


def check_encoder_generator(
    meta: Mapping[str, Any], generator, encoder_name: str, generator_name: str
) -> None:
    """Refuses an encoder made for another generator than ``generator`` (resolution, style
    count, the trained-against generator's sha256, or the weights of the decoder in an
    official file), naming both.

    Raises:
        CheckpointError: they do not belong together.
    """
    trained = meta.get("generator") or {}
    res = trained.get("resolution")
    if res not in (None, generator.resolution) or trained.get("n_styles") not in (None, generator.n_styles):
        raise CheckpointError(
            f"{encoder_name}: the encoder was made for a {res}-px generator ({trained.get('n_styles')} "
            f"styles); the configured generator {generator_name} is {generator.resolution}-px "
            f"({generator.n_styles} styles)"
        )
    if trained.get("sha256") not in (None, state_sha256(generator)):
        raise CheckpointError(
            f"{encoder_name}: the encoder was trained against generator {trained['sha256'][:12]}..., "
            f"not the configured one {generator_name} ({state_sha256(generator)[:12]}...)"
        )
    ours = trained.get("weights_sha256")
    if ours is not None and ours != weights_sha256(generator):
        raise CheckpointError(
            f"{encoder_name}: its decoder (weights {ours[:12]}...) differs from the configured generator "
            f"{generator_name} (weights {weights_sha256(generator)[:12]}...); set generator.checkpoint "
            "to the encoder's own file to use its decoder"
        )


FUSER_FORMAT = "mambastyle-fuser"
# 2: VSS block modules named as in the published MambaStyle code.
FUSER_FORMAT_VERSION = 2


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
    version = ckpt.get("version")
    if version not in (1, FUSER_FORMAT_VERSION):
        raise CheckpointError(f"{name}: fuser checkpoint version {version!r} is not supported")
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
    if version == 1:
        from mambastyle.models.encoders_v1 import v1_state_dict

        sd, _ = v1_state_dict(sd)
    _load_strict(fuser, sd, f"{name}: fuser weights do not match the stored config")
    meta = {k: v for k, v in ckpt.items() if k not in ("encoder", "fuser")}
    meta["encoder"] = {k: v for k, v in ckpt["encoder"].items() if k not in ("state_dict", "latent_avg")}
    meta["fuser"] = {"config": config.to_dict()}
    return encoder, fuser.to(device).eval(), meta


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, values) in name order, and
    its ``latent_avg``.

    The identity of a generator independent of the file it came from: two loads of the
    same weights (or the same seeded random init) agree; any changed weight does not.
    """
    return _state_hash(module, with_latent_avg=True)


def _state_hash(module: torch.nn.Module, with_latent_avg: bool) -> str:
    h = hashlib.sha256()
    for name, value in sorted(unwrap_state_dict(module.state_dict()).items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    latent_avg = getattr(module, "latent_avg", None)
    if with_latent_avg and isinstance(latent_avg, torch.Tensor):  # non-persistent in the generator
        h.update(b"latent_avg|" + latent_avg.detach().cpu().double().numpy().tobytes())
    return h.hexdigest()
