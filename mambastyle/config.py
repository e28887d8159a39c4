"""Typed, validated view of ``params.yaml``.

Config flows one way: ``params.yaml`` -> these frozen dataclasses -> plain function
arguments. Every key must be present (no hidden defaults: what a stage uses is written
in the file, so ``dvc exp run -S key=value`` can change it), unknown keys are errors,
and every error names the offending key, e.g.
``params.yaml: generator.architecture.resolution: must be a power of two ...``.

The file is long because it is a declarative schema: one dataclass per params section, each
with its own validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mambastyle.errors import InvalidConfig, check_at_least
from mambastyle.models.stylegan2 import GeneratorConfig

T = TypeVar("T")


class ConfigError(InvalidConfig):
    """``params.yaml`` is malformed; ``key`` is the dotted path of the offending entry."""

    def __init__(self, key: str, message: str, source: str = "params.yaml"):
        self.source = source
        super().__init__(key, message)
        self.args = (f"{source}: {key}: {message}" if key else f"{source}: {message}",)

    def __str__(self) -> str:
        return self.args[0]


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class StorageParams:
    """Where stage data lives. ``root`` is a local directory or ``s3://bucket/prefix``.

    Credentials never appear here: they come from the standard AWS chain.
    """

    root: str
    endpoint_url: str | None
    region: str | None
    profile: str | None

    def options(self):
        """The storage module's options (S3 endpoint, region, profile)."""
        from mambastyle.storage import StorageOptions

        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region, profile=self.profile)


@dataclass(frozen=True)
class RayParams:
    """``address: null`` starts a local Ray instance; ``auto`` or ``ray://...`` joins a cluster."""

    address: str | None
    num_cpus: int | None
    num_gpus: int | None


@dataclass(frozen=True)
class SampleParams:
    """A grid of generator samples (the generator stage's picture)."""

    seed: int
    num: int
    truncation: float
    noise_mode: Literal["const", "random", "none"]

    def __post_init__(self) -> None:
        if not 1 <= self.num <= 256:
            raise InvalidConfig("num", f"must be between 1 and 256, got {self.num}")


@dataclass(frozen=True)
class GeneratorParams:
    """The StyleGAN2 generator: a rosinality-format checkpoint, or random init when null.

    With a checkpoint, ``architecture.resolution`` must match it and the other
    architecture fields are read from the file.
    """

    checkpoint: str | None
    architecture: GeneratorConfig
    init_seed: int
    latent_avg_samples: int
    sample: SampleParams

    def __post_init__(self) -> None:
        check_at_least(self, 1, "latent_avg_samples")

    def identity(self) -> dict:
        """What determines the generator's weights and ``latent_avg`` (not ``sample``, which only
        shapes the generator stage's picture): the part run ids and later stages depend on."""
        return {"checkpoint": self.checkpoint, "architecture": to_dict(self.architecture),
                "init_seed": self.init_seed, "latent_avg_samples": self.latent_avg_samples}  # fmt: skip


@dataclass(frozen=True)
class SplitParams:
    train: float
    val: float
    test: float

    def __post_init__(self) -> None:
        parts = (self.train, self.val, self.test)
        if min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
            raise InvalidConfig("", f"fractions must be >= 0 and sum to 1, got {parts}")


@dataclass(frozen=True)
class PrepareParams:
    """Face alignment of raw photos into WebDataset shards under ``{storage.root}/shards``."""

    source: str  # demo | a folder | s3://bucket/prefix
    output_size: int
    multi_face: Literal["largest", "each", "reject"]
    min_face_size: int
    min_score: float
    upsample: int
    max_pixels: int
    shard_max_samples: int
    shard_max_bytes: int
    split: SplitParams
    workers: int
    executor: Literal["processes", "ray"]
    # over an existing dataset: only new inputs are processed, into appended shards; inputs that
    # left the source leave the shards (sync) or stay (extend)
    mode: Literal["sync", "extend"]

    def __post_init__(self) -> None:
        if self.output_size < 8 or self.output_size & (self.output_size - 1):
            raise InvalidConfig("output_size", f"must be a power of two >= 8, got {self.output_size}")
        check_at_least(
            self, 1, "shard_max_samples", "shard_max_bytes", "min_face_size", "max_pixels", "workers"
        )
        check_at_least(self, 0, "upsample")


@dataclass(frozen=True)
class SyntheticParams:
    """Generator samples used as training pairs (their W+ is the ground truth)."""

    truncation: float  # psi towards latent_avg (1 = none)
    mixing: float  # probability of style mixing two w at a random layer

    def __post_init__(self) -> None:
        if not 0.0 < self.truncation <= 1.0:
            raise InvalidConfig("truncation", f"must be in (0, 1], got {self.truncation}")
        if not 0.0 <= self.mixing <= 1.0:
            raise InvalidConfig("mixing", f"must be in [0, 1], got {self.mixing}")


@dataclass(frozen=True)
class OptimizerParams:
    """AdamW with linear warm-up then cosine decay, global gradient-norm clipping."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float  # the LR decays to lr * min_lr_ratio at the last step
    grad_clip: float  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise InvalidConfig("lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise InvalidConfig("betas", f"needs two values in [0, 1), got {list(self.betas)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InvalidConfig("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check_at_least(self, 0, "weight_decay", "warmup_steps", "grad_clip")


@dataclass(frozen=True)
class LossParams:
    """Weight of each loss term (0 switches a term off)."""

    l2: float  # pixel MSE against the (resized) target
    lpips: float  # LPIPS (AlexNet) perceptual distance
    id: float  # 1 - ArcFace cosine similarity
    w_norm: float  # ||w+ - latent_avg|| regulariser
    latent: float  # MSE to the true W+ on synthetic steps (latent recovery)

    def __post_init__(self) -> None:
        check_at_least(self, 0, "l2", "lpips", "id", "w_norm", "latent")


@dataclass(frozen=True)
class PretrainedParams:
    """Pretrained networks the losses need; never downloaded at run time.

    A path (local or s3://) or null; for LPIPS, null means torchvision's AlexNet file in the
    torch hub cache when it is there. A missing file for a weighted term is reported and
    the term is switched off, unless ``required`` is true (then the stage stops).
    """

    lpips_alexnet: str | None
    arcface: str | None
    required: bool


@dataclass(frozen=True)
class TrainParams:
    """Encoder training (Ray Train): the loop, its losses and how it is scaled."""

    encoder: str  # a registered encoder (``mambastyle encoder list``)
    input_size: int  # encoder input side; losses are computed at this size
    steps: int
    batch_size: int  # per worker
    synthetic_ratio: float  # fraction of steps on generator samples instead of real images
    synthetic: SyntheticParams
    optimizer: OptimizerParams
    loss: LossParams
    pretrained: PretrainedParams
    flip: bool  # random horizontal flips of real images
    ema_decay: float  # 0 = off; e.g. 0.999 (the exported encoder is the EMA)
    amp: bool  # mixed precision on CUDA (ignored on CPU)
    max_nonfinite: int  # steps skipped for a non-finite loss before the run stops
    log_every: int
    eval_every: int
    eval_samples: int  # held-out synthetic samples for the latent-recovery metric
    checkpoint_every: int
    image_every: int  # reconstruction grids (0 = only at the end)
    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    max_failures: int  # worker-group restarts from the last checkpoint before giving up
    seed: int

    def __post_init__(self) -> None:
        from mambastyle.models.encoders import ENCODERS

        if self.encoder not in ENCODERS:
            raise InvalidConfig(
                "encoder", f"unknown encoder {self.encoder!r}; registered: {sorted(ENCODERS)}"
            )
        if ENCODERS[self.encoder].defaults["arch"].startswith("restyle"):
            raise InvalidConfig(
                "encoder",
                f"{self.encoder!r} refines with the generator in the loop and is not trained here; "
                "use its official checkpoint as invert.encoder",
            )
        if self.input_size < 32 or self.input_size & (self.input_size - 1):
            raise InvalidConfig("input_size", f"must be a power of two >= 32, got {self.input_size}")
        check_at_least(self, 1, "steps", "batch_size", "num_workers", "cpus_per_worker", "log_every",
                       "eval_every", "eval_samples", "checkpoint_every")  # fmt: skip
        check_at_least(self, 0, "max_nonfinite", "max_failures", "image_every")
        if not 0.0 <= self.synthetic_ratio <= 1.0:
            raise InvalidConfig("synthetic_ratio", f"must be in [0, 1], got {self.synthetic_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InvalidConfig("ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class FuserDirectionParams:
    """A family of edits the fuser is trained on: ``d = s * direction``, s ~ U(strength)."""

    source: Literal["interfacegan", "ganspace", "random"]  # random: a fresh unit direction in W per sample
    uri: str | None  # interfacegan / ganspace: the file (path or s3://)
    component: int | None  # ganspace: the principal component
    strength: tuple[float, float]  # [low, high]; ganspace and random: in standard deviations of W
    layers: tuple[int, int] | None  # [start, stop) of the styles edited; null = all

    def __post_init__(self) -> None:
        needs = {"interfacegan": ("uri",), "ganspace": ("uri", "component"), "random": ()}
        for key in needs[self.source]:
            if getattr(self, key) is None:
                raise InvalidConfig(key, f"must be set for source {self.source!r}")
        if len(self.strength) != 2 or self.strength[0] > self.strength[1]:
            raise InvalidConfig(
                "strength", f"must be [low, high] with low <= high, got {list(self.strength)}"
            )
        if self.layers is not None and (len(self.layers) != 2 or not 0 <= self.layers[0] < self.layers[1]):
            raise InvalidConfig("layers", f"must be [start, stop) with 0 <= start < stop, got {self.layers}")


@dataclass(frozen=True)
class FuserLossParams:
    """Weights of the fuser's loss terms (0 switches a term off)."""

    l2: float  # pixel MSE of the (edited) reconstruction against its target
    lpips: float  # LPIPS (AlexNet); weights from train.pretrained
    id: float  # ArcFace identity; weights from train.pretrained
    feature: float  # smooth L1 of the correction to what the W+ code misses at the injected block
    cycle: float  # re-encode the edited output, undo the edit, compare with the source image
    w_norm: float  # ||w+ - latent_avg|| when the encoder is trained too

    def __post_init__(self) -> None:
        check_at_least(self, 0, "l2", "lpips", "id", "feature", "cycle", "w_norm")


@dataclass(frozen=True)
class FuserParams:
    """F-space fuser training (Ray Train, like the encoder's) and its use by invert and edit."""

    enabled: bool  # run the fuser stage; invert and edit use the fuser only when true
    name: str  # a registered fuser (fuser, fuser_small, fuser_tiny)
    encoder: str | None  # the encoder checkpoint it refines; null = the train stage's
    inject_res: int | None  # generator block the correction is added to; null = matching the features
    train_encoder: bool  # also fine-tune the encoder (else only the fuser and the encoder's feature adapter)
    steps: int
    batch_size: int  # per worker
    real_every: int  # every n-th step inverts a real batch (zero direction); 0 = synthetic edits only
    synthetic: SyntheticParams
    directions: tuple[FuserDirectionParams, ...]
    optimizer: OptimizerParams
    loss: FuserLossParams
    flip: bool
    amp: bool
    max_nonfinite: int
    log_every: int
    eval_every: int
    eval_images: int  # held-out real images (val, then test split) for the with/without-fuser metrics
    checkpoint_every: int
    image_every: int
    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    max_failures: int
    seed: int

    def __post_init__(self) -> None:
        from mambastyle.models.fuser import FUSERS

        if self.name not in FUSERS:
            raise InvalidConfig("name", f"unknown fuser {self.name!r}; registered: {sorted(FUSERS)}")
        check_at_least(self, 1, "steps", "batch_size", "num_workers", "cpus_per_worker", "log_every",
                       "eval_every", "eval_images", "checkpoint_every")  # fmt: skip
        check_at_least(self, 0, "real_every", "max_nonfinite", "max_failures", "image_every")
        if self.real_every != 1 and not self.directions:
            raise InvalidConfig("directions", "list at least one edit family (or set real_every: 1)")


@dataclass(frozen=True)
class InvertParams:
    """Bulk inversion into a Parquet latent table (Ray Data)."""

    encoder: str | None  # an encoder or fuser checkpoint (path or s3://); null = the fuser or train stage's
    metrics: bool  # render reconstructions and record mse/ssim (and lpips when available)
    lpips_alexnet: str | None  # LPIPS backbone file; null = the torch hub cache when present
    batch_size: int
    num_actors: int | None  # null = one per GPU (use_gpu), else one single-threaded actor per CPU
    use_gpu: bool
    row_group_size: int
    rows_per_file: int  # at least this many rows per part file (the last of a run may have fewer)
    # bf16: the models under bfloat16 autocast (native on AMX / AVX-512-BF16 CPUs and recent GPUs)
    precision: Literal["fp32", "bf16"]

    def __post_init__(self) -> None:
        check_at_least(self, 1, "batch_size", "row_group_size", "rows_per_file")
        if self.num_actors is not None:
            check_at_least(self, 1, "num_actors")


@dataclass(frozen=True)
class EvaluateEncoderParams:
    """One encoder of the evaluate stage's comparison."""

    name: str  # letters, digits, underscores: its key in comparison.json
    uri: str | None  # an encoder, fuser or official training checkpoint; null = the invert stage's

    def __post_init__(self) -> None:
        import re

        if not re.match(r"^[A-Za-z0-9_]+$", self.name):
            raise InvalidConfig("name", f"use letters, digits and underscores only, got {self.name!r}")


@dataclass(frozen=True)
class EditabilityParams:
    """How editable each encoder's codes are: a pose direction applied at a few strengths."""

    direction: str | None  # a yaw direction file (InterFaceGAN layout); null = fitted from the table's yaw
    strengths: tuple[float, ...]  # distances moved along the direction (0 is added as the reference)

    def __post_init__(self) -> None:
        if not [s for s in self.strengths if s != 0]:
            raise InvalidConfig("strengths", "needs at least one nonzero strength")


@dataclass(frozen=True)
class EvaluateParams:
    """Encoder evaluation: reconstructions of one split, latent recovery, size and speed."""

    split: str  # the split whose faces are reconstructed (test)
    lpips_alexnet: str | None  # LPIPS backbone; null = invert.lpips_alexnet, else the torch hub cache
    arcface: str | None  # ArcFace IR-SE50 for identity similarity; null = train.pretrained.arcface
    synthetic_samples: int  # held-out generator samples for latent recovery
    seed: int  # their z seed (the train stage draws its own from train.seed)
    truncation: float
    batch_size: int
    latency_batches: int  # timed encoder batches (after one warm-up)
    grid_samples: int  # faces in the reconstruction picture
    encoders: tuple[EvaluateEncoderParams, ...]  # compared side by side on the same faces
    editability: EditabilityParams
    precision: Literal["fp32", "bf16"]  # bf16: the models under bfloat16 autocast, metrics in float32

    def __post_init__(self) -> None:
        check_at_least(self, 1, "synthetic_samples", "batch_size", "latency_batches", "grid_samples")
        names = [e.name for e in self.encoders]
        if not names:
            raise InvalidConfig("encoders", "list at least one encoder (uri null: the invert stage's)")
        if len(set(names)) != len(names):
            raise InvalidConfig("encoders", f"names must be unique, got {names}")


@dataclass(frozen=True)
class EditEntryParams:
    """One edit: a direction (fitted from the table, or from a file) and its strengths."""

    name: str  # letters, digits, underscores: names the edit in the edits table and its grid
    source: Literal["fit", "interfacegan", "ganspace"]
    uri: str | None  # interfacegan / ganspace: the direction or PCA file (path or s3://)
    component: int | None  # ganspace: the principal component
    absolute: bool  # ganspace: strength is the coordinate to move to (e4e's edits), not a step in std
    column: str | None  # fit: the numeric or boolean column (of the table, or of `labels`)
    labels: str | None  # fit: a .csv/.parquet with `key` and `column`, joined to the table by key
    fit_where: str | None  # fit: SQL condition choosing the rows fitted on
    space: Literal["W", "W+"]  # fit: one direction for all layers (W) or per layer (W+)
    strengths: tuple[float, ...]
    layers: tuple[int, int] | None  # [start, stop) of the styles edited; null = all

    def __post_init__(self) -> None:
        import re

        if not re.match(r"^[A-Za-z0-9_]+$", self.name):
            raise InvalidConfig("name", f"use letters, digits and underscores only, got {self.name!r}")
        needs = {"fit": ("column", "fit_where"), "interfacegan": ("uri",), "ganspace": ("uri", "component")}
        for key in needs[self.source]:
            if getattr(self, key) is None:
                raise InvalidConfig(key, f"must be set for source {self.source!r}")
        if self.absolute and self.source != "ganspace":
            raise InvalidConfig("absolute", f"applies to source 'ganspace' only, not {self.source!r}")
        if not self.strengths:
            raise InvalidConfig("strengths", "give at least one strength")
        if len(set(self.strengths)) != len(self.strengths):
            raise InvalidConfig("strengths", f"repeated values in {list(self.strengths)}")
        if self.layers is not None and (len(self.layers) != 2 or not 0 <= self.layers[0] < self.layers[1]):
            raise InvalidConfig(
                "layers", f"must be [start, stop) with 0 <= start < stop, got {list(self.layers)}"
            )


@dataclass(frozen=True)
class EditParams:
    """Bulk edits of selected rows of a latent table (Ray Data)."""

    table: str | None  # a latent table URI; null = the invert stage's table
    where: str  # SQL condition over the table's columns choosing the rows to edit
    edits: tuple[EditEntryParams, ...]
    mode: Literal["w_plus", "fuser"]  # render codes alone, or re-encode each source face for the fuser
    output: Literal["shards", "folder"]  # WebDataset tar shards, or one PNG per image (small jobs)
    images_per_shard: int
    batch_size: int  # images per generator forward
    num_actors: int
    use_gpu: bool
    row_group_size: int
    rows_per_file: int
    grid_samples: int  # rows of each edit's picture
    precision: Literal["fp32", "bf16"]  # bf16: the models under bfloat16 autocast

    def __post_init__(self) -> None:
        check_at_least(self, 1, "images_per_shard", "batch_size", "num_actors", "row_group_size",
                       "rows_per_file", "grid_samples")  # fmt: skip
        if not self.edits:
            raise InvalidConfig("edits", "list at least one edit")
        names = [e.name for e in self.edits]
        if len(set(names)) != len(names):
            raise InvalidConfig("edits", f"edit names must be unique, got {names}")


@dataclass(frozen=True)
class ServeParams:
    """The interactive editing service (``mambastyle serve``, Ray Serve)."""

    table: str | None  # a latent table URI (its encoder and fuser are served); null = edit.table, else
    # the invert stage's table
    edits: tuple[EditEntryParams, ...] | None  # the directions offered; null = edit.edits
    mode: Literal["w_plus", "fuser"]  # a request's mode when it names none
    host: str  # 127.0.0.1 keeps it on this machine; 0.0.0.0 on a cluster's head node
    port: int
    replicas: int
    num_cpus: float  # per replica (its torch threads: at least one)
    num_gpus: float  # per replica; > 0 runs the models on a GPU
    max_batch_size: int  # concurrent requests run through the models together
    batch_wait_timeout_s: float  # how long a request waits for others to share its batch
    max_upload_bytes: int  # a larger body is refused (413) before it is decoded
    max_edits: int  # directions combined in one request
    cache_entries: int  # recent uploads kept per replica (aligned face and code), so that a page
    # moving a slider re-sends a reference, not the photo
    precision: Literal["fp32", "bf16"]  # bf16: the models under bfloat16 autocast

    def __post_init__(self) -> None:
        check_at_least(self, 1, "port", "replicas", "max_batch_size", "max_upload_bytes", "max_edits")
        check_at_least(self, 0, "num_gpus", "batch_wait_timeout_s", "cache_entries")
        if self.port > 65535:
            raise InvalidConfig("port", f"must be at most 65535, got {self.port}")
        if self.num_cpus < 1:
            raise InvalidConfig("num_cpus", f"must be at least 1, got {self.num_cpus}")
        if self.edits is not None:
            names = [e.name for e in self.edits]
            if not names or len(set(names)) != len(names):
                raise InvalidConfig("edits", f"list edits with unique names (or null), got {names}")


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``: one section per stage plus ``storage`` and ``ray``."""

    storage: StorageParams
    ray: RayParams
    generator: GeneratorParams
    prepare: PrepareParams
    train: TrainParams
    fuser: FuserParams
    invert: InvertParams
    evaluate: EvaluateParams
    edit: EditParams
    serve: ServeParams


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts lists/ints where lossless."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise InvalidConfig(key, "must not be null")
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except InvalidConfig as exc:
                errors.append(exc.message)
        raise InvalidConfig(key, " or ".join(dict.fromkeys(errors)))
    if value is None:
        raise InvalidConfig(key, f"must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            raise InvalidConfig(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise InvalidConfig(key, f"must be a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidConfig(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfig(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidConfig(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InvalidConfig(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type[T], data: Any, key: str) -> T:
    """Builds dataclass ``cls`` from a mapping, requiring every field and no others."""
    if not isinstance(data, Mapping):
        raise InvalidConfig(key, f"must be a mapping, got {type(data).__name__} {data!r}")
    prefix = f"{key}." if key else ""
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected: {', '.join(names)})"
            raise InvalidConfig(f"{prefix}{k}", f"unknown key{hint}")
    for n in names:
        if n not in data:
            raise InvalidConfig(f"{prefix}{n}", "missing (every parameter must be set in the file)")
    hints = get_type_hints(cls)
    kwargs = {n: _coerce(hints[n], data[n], f"{prefix}{n}") for n in names}
    try:
        return cls(**kwargs)
    except InvalidConfig as exc:
        # An empty key means the error is about the object as a whole.
        raise InvalidConfig(f"{prefix}{exc.key}" if exc.key else key, exc.message) from None


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validates an already-parsed params mapping."""
    try:
        return _build(Params, data, "")
    except InvalidConfig as exc:
        raise ConfigError(exc.key, exc.message, source) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates a params file.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or a key is missing,
            unknown, of the wrong type or out of range (the message names it).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read: {exc.strerror or exc}", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {exc}", str(path)) from None
    return parse_params(data, str(path))


def to_dict(obj: Any) -> Any:
    """Plain-Python (JSON/YAML-ready) form of a params object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj
