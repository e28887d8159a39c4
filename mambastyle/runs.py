"""Training runs: their identity, where they live and what they export.

A run's id is derived from its inputs (params, shard manifest, code), so re-running the same
job resumes its latest checkpoint instead of starting over and a finished run is not trained
again; the invert stage finds the train and fuser stages' outputs by the same ids. Layout
under ``{storage.root}/train-runs/{run_id}/`` (``fuser-runs/`` for the fuser):

- ``checkpoint_{step}/state.pt``: Ray Train's checkpoints (weights, optimizer, scheduler,
  scaler, EMA, step and data position), the last two kept;
- ``artifacts/metrics.jsonl``: one line per report (rank 0), trimmed back to the restored
  step after a restart, so it never holds a step twice;
- ``artifacts/images/recon-{step}.png``: reconstruction grids (input | reconstruction);
- ``artifacts/encoder.pt`` or ``artifacts/fuser.pt``: the exported model.

The Ray Train side (workers, ``fit``) is :mod:`mambastyle.train.distributed`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass

import torch

from mambastyle import __version__
from mambastyle.checkpoints import encoder_payload, read_checkpoint
from mambastyle.codegraph import source_hash
from mambastyle.config import (
    FuserParams,
    GeneratorParams,
    PretrainedParams,
    StorageParams,
    TrainParams,
    to_dict,
)
from mambastyle.data.shards import ShardError, check_feeds, manifest_shards
from mambastyle.storage import Location, exists, read_bytes, resolve, write_bytes

STATE_FILE = "state.pt"
RUNS_DIR = "train-runs"  # under storage.root
FUSER_RUNS_DIR = "fuser-runs"
# what a run executes: its code hash covers this module and everything it imports
TRAINING_CODE = "mambastyle.train.distributed"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs (plain, picklable): the params sections and where data lives.

    ``train`` is the encoder's training params, or a fuser's (``FuserParams``, with the encoder
    it refines in ``encoder_uri`` and the pretrained files in ``pretrained``)."""

    train: TrainParams | FuserParams
    generator: GeneratorParams
    storage: StorageParams
    run_id: str
    runs_dir: str = RUNS_DIR
    encoder_uri: str | None = None
    encoder_sha256: str | None = None
    pretrained: PretrainedParams | None = None

    @property
    def root(self) -> str:
        return self.storage.root

    def location(self, *parts: str) -> Location:
        return resolve(self.root, self.storage.options()).join(*parts)

    @property
    def artifacts(self) -> Location:
        return self.location(self.runs_dir, self.run_id, "artifacts")


@functools.cache
def code_hash() -> str:
    """Hash of the code a training run executes (the Ray Train workers and everything they
    import), so that changed code starts a new run instead of resuming an old one."""
    return source_hash(TRAINING_CODE, salt=__version__)


def run_id(
    train: TrainParams | FuserParams,
    generator: GeneratorParams,
    manifest: bytes | None,
    extra: dict | None = None,
) -> str:
    """A run id from the inputs (params, shard manifest, code; for a fuser also the encoder it
    refines and the pretrained files): same inputs -> same run (resumed), any change -> a new one."""
    h = hashlib.sha256(code_hash().encode())
    inputs = {"train": to_dict(train), "generator": generator.identity(), **(extra or {})}
    h.update(json.dumps(inputs, sort_keys=True).encode())
    h.update(manifest or b"no-real-data")
    return f"run-{h.hexdigest()[:16]}"


def load_state(checkpoint) -> dict:
    """The ``state.pt`` of a Ray checkpoint (``weights_only`` loading)."""
    with checkpoint.as_directory() as d:
        return read_checkpoint(os.path.join(d, STATE_FILE))


def export_encoder(job: TrainJob, state: dict) -> tuple[Location, str, dict]:
    """Writes the user-facing encoder checkpoint (EMA weights when enabled) to
    ``artifacts/encoder.pt``; returns (location, sha256, payload without weights)."""
    from mambastyle.models.encoders import EncoderConfig, build_encoder_from_config

    encoder = build_encoder_from_config(EncoderConfig.from_dict(dict(state["encoder_config"])))
    encoder.load_state_dict(state["ema"] if state.get("ema") is not None else state["encoder"])
    encoder.set_latent_avg(state["encoder_latent_avg"])
    payload = encoder_payload(
        encoder,
        generator=state["generator"],
        step=state["step"],
        extra={
            "train": {"run": job.run_id, "params": state["params"], "loss_status": state.get("loss_status")}
        },
    )
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    loc = job.artifacts.join("encoder.pt")
    write_bytes(loc, data)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return loc, hashlib.sha256(data).hexdigest(), meta


def export_fuser(job: TrainJob, state: dict) -> tuple[Location, str, dict]:
    """Writes the fuser checkpoint (the encoder it was trained with and the fuser) to
    ``artifacts/fuser.pt``; returns (location, sha256, payload without weights)."""
    from mambastyle.checkpoints import fuser_payload
    from mambastyle.models.encoders import EncoderConfig, build_encoder_from_config
    from mambastyle.models.fuser import FuserConfig, build_fuser_from_config

    encoder = build_encoder_from_config(EncoderConfig.from_dict(dict(state["encoder_config"])))
    encoder.load_state_dict(state["encoder"])
    encoder.set_latent_avg(state["encoder_latent_avg"])
    fuser = build_fuser_from_config(FuserConfig.from_dict(dict(state["fuser_config"])))
    fuser.load_state_dict(state["fuser"])
    info = {"run": job.run_id, "params": state["params"], "loss_status": state.get("loss_status"),
            "encoder_source": state.get("encoder_source")}  # fmt: skip
    extra = {"fuser_train": info}
    payload = fuser_payload(encoder, fuser, generator=state["generator"], step=state["step"], extra=extra)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    loc = job.artifacts.join("fuser.pt")
    write_bytes(loc, data)
    meta = {k: v for k, v in payload.items() if k not in ("encoder", "fuser")}
    meta["fuser_config"] = payload["fuser"]["config"]
    return loc, hashlib.sha256(data).hexdigest(), meta


def trained_encoder(params, manifest_bytes: bytes | None) -> tuple[Location, str]:
    """Where the train stage puts the encoder for these params: (location, URI as the params name it)."""
    parts = (RUNS_DIR, run_id(params.train, params.generator, manifest_bytes), "artifacts", "encoder.pt")
    root = resolve(params.storage.root, params.storage.options())
    return root.join(*parts), "/".join((params.storage.root.rstrip("/"), *parts))


def _shard_manifest(params, needs_real: bool, num_workers: int) -> tuple[Location, bytes | None]:
    """(the storage root, the shard manifest's bytes or None); when the run needs real images,
    a missing manifest or unreadable train shards fail here, before any worker starts."""
    root = resolve(params.storage.root, params.storage.options())
    manifest_loc = root.join("shards", "manifest.json")
    manifest = read_bytes(manifest_loc) if exists(manifest_loc) else None
    if needs_real:
        if manifest is None:
            raise ShardError(f"no shard manifest at {manifest_loc.uri}: run the prepare stage first")
        check_feeds(manifest_shards(root, "train"), num_workers)
    return root, manifest


def encoder_job(params) -> TrainJob:
    """The encoder training run these params describe."""
    tp = params.train
    root, manifest = _shard_manifest(params, tp.synthetic_ratio < 1.0, tp.num_workers)
    # Workers run elsewhere (another directory, another node): give them an absolute root.
    storage = dataclasses.replace(params.storage, root=root.uri)
    return TrainJob(tp, params.generator, storage, run_id(tp, params.generator, manifest))


def fuser_job(params) -> tuple[TrainJob, dict]:
    """The fuser run these params describe (its id covers the encoder file and the pretrained
    files), and the encoder it refines ({uri as the params name it, sha256})."""
    from mambastyle.checkpoints import checkpoint_source, file_sha256
    from mambastyle.errors import CheckpointError

    options = params.storage.options()
    fp = params.fuser
    root, manifest = _shard_manifest(params, fp.real_every > 0, fp.num_workers)
    if fp.encoder is not None:
        encoder_loc, encoder_name = resolve(fp.encoder, options), fp.encoder
    else:
        encoder_loc, encoder_name = trained_encoder(params, manifest)
    if not exists(encoder_loc):
        hint = "" if fp.encoder is not None else " (the train stage's encoder for these params: run it first)"
        raise CheckpointError(f"no encoder at {encoder_loc.uri}{hint}")
    src = checkpoint_source(encoder_loc.uri, options)
    encoder_sha = file_sha256(src.getvalue() if hasattr(src, "getvalue") else src)
    extra = {"encoder_sha256": encoder_sha, "pretrained": to_dict(params.train.pretrained)}
    storage = dataclasses.replace(params.storage, root=root.uri)  # absolute, as for the encoder
    job = TrainJob(fp, params.generator, storage, run_id(fp, params.generator, manifest, extra),
                   runs_dir=FUSER_RUNS_DIR, encoder_uri=encoder_loc.uri, encoder_sha256=encoder_sha,
                   pretrained=params.train.pretrained)  # fmt: skip
    return job, {"uri": encoder_name, "sha256": encoder_sha}
