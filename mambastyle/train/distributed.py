"""Ray Train wrapper: the training loop on N workers (DDP), checkpointed to local disk or S3.

Layout under ``{storage.root}/train-runs/{run}/`` (Ray Train's run directory):

- ``checkpoint_{step}/state.pt``: Ray Train's checkpoints (encoder, optimizer, scheduler,
  scaler, EMA, step and data position), the last two kept;
- ``artifacts/metrics.jsonl``: one line per report (rank 0), rewritten whole, trimmed back
  to the restored step after a restart, so it never holds a step twice;
- ``artifacts/images/recon-{step}.png``: reconstruction grids (input | reconstruction);
- ``artifacts/encoder.pt``: the exported encoder (written by :func:`export_encoder`).

``run`` is derived from the inputs (shard manifest, generator, train params), so re-running
the same job resumes its latest checkpoint instead of starting over, and a finished run is
not trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mambastyle.checkpoints import encoder_payload, read_checkpoint, state_sha256
from mambastyle.config import (
    FuserParams,
    GeneratorParams,
    PretrainedParams,
    StorageParams,
    TrainParams,
    to_dict,
)
from mambastyle.runtime import worker_env
from mambastyle.storage import Location, exists, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RUNS_DIR = "train-runs"  # under storage.root
FUSER_RUNS_DIR = "fuser-runs"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs (plain, picklable): the params sections and where data lives.

    ``train`` is the encoder's training params, or a fuser's (``FuserParams``, with the encoder
    it refines in ``encoder_uri`` and the pretrained files in ``pretrained``)."""

    train: TrainParams | FuserParams
    generator: GeneratorParams
    storage: StorageParams
    run: str
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
        return self.location(self.runs_dir, self.run, "artifacts")


def code_hash() -> str:
    """Hash of the source that shapes a trained encoder (models, layers, training, generator
    loading), so that changed code starts a new run instead of resuming an old one."""
    import mambastyle

    base = Path(mambastyle.__file__).parent
    h = hashlib.sha256(mambastyle.__version__.encode())
    files = [p for d in ("train", "models", "layers") for p in sorted((base / d).glob("*.py"))]
    files += [base / "generate.py", base / "checkpoints.py"]
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_name(
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


def _metrics_history(loc: Location, upto: int) -> list[dict]:
    """Saved report lines with ``step <= upto`` (steps after a restored checkpoint are dropped)."""
    if not exists(loc):
        return []
    lines = [json.loads(line) for line in read_bytes(loc).decode().splitlines() if line.strip()]
    return [m for m in lines if m["step"] <= upto]


def _val_images(job: TrainJob, n: int, splits: tuple[str, ...]) -> torch.Tensor | None:
    """Up to ``n`` real images for evaluation and pictures, from ``splits`` in turn (the trainer's
    ``shown_images``)."""
    from mambastyle.data.shards import ShardError, manifest_shards
    from mambastyle.train.data import ShardStream

    root = resolve(job.root, job.storage.options())
    images: list[torch.Tensor] = []
    for split in splits:
        try:
            shards = manifest_shards(root, split)
        except ShardError:
            return None
        if shards and len(images) < n:
            stream = ShardStream(shards, 0, 1, seed=0, shuffle_buffer=1, options=job.storage.options())
            count = min(n - len(images), sum(s.samples for s in shards))
            it = stream.samples(0)
            images += [next(it)[1] for _ in range(count)]
    return torch.stack(images) if images else None


def _setup(job: TrainJob):
    """Per worker: Ray context, threads, device, the frozen generator."""
    import ray.train

    from mambastyle.generate import resolve_generator

    p = job.train
    ctx = ray.train.get_context()
    torch.set_num_threads(p.cpus_per_worker)
    device = ray.train.torch.get_device() if p.use_gpu else torch.device("cpu")
    gp = job.generator
    g = resolve_generator(gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples,
                          device=device, options=job.storage.options())  # fmt: skip
    return ctx.get_world_rank(), ctx.get_world_size(), device, g


def train_worker(config: dict) -> None:
    """``train_loop_per_worker`` of the encoder: builds everything, restores the latest checkpoint, trains."""
    from torch.nn.parallel import DistributedDataParallel

    from mambastyle.models.encoders import build_encoder
    from mambastyle.train.loop import Trainer
    from mambastyle.train.losses import build_loss

    job: TrainJob = config["job"]
    p = job.train
    rank, world, device, g = _setup(job)
    encoder = build_encoder(
        p.encoder, g.resolution, seed=p.seed, input_size=p.input_size, style_dim=g.style_dim
    )
    encoder = encoder.to(device)
    encoder.set_latent_avg(g.latent_avg)
    loss, status = build_loss(p.loss, p.pretrained, job.storage.options())
    if hasattr(encoder, "feature_adapter"):
        # Only the F-space path uses it; W+ training never does, and DDP refuses parameters
        # that get no gradient (unless it searches for them every step).
        encoder.feature_adapter.requires_grad_(False)
    model = encoder
    if world > 1:
        model = DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(model, g, loss, p, rank=rank, device=device)
    _train(
        job, trainer, g, rank, world, device, {"loss_status": {"active": status.active, "off": status.off}}
    )


def fuser_worker(config: dict) -> None:
    """``train_loop_per_worker`` of the fuser: the encoder from ``job.encoder_uri``, a new fuser."""
    from mambastyle.checkpoints import checkpoint_source, load_encoder
    from mambastyle.config import LossParams
    from mambastyle.models.fuser import build_fuser
    from mambastyle.train.fuser import EditSampler, FuserModel, FuserTrainer
    from mambastyle.train.losses import build_loss

    job: TrainJob = config["job"]
    p: FuserParams = job.train
    options = job.storage.options()
    rank, world, device, g = _setup(job)
    encoder, meta = load_encoder(checkpoint_source(job.encoder_uri, options), device=device)
    encoder.set_latent_avg(g.latent_avg)
    fuser = build_fuser(p.name, encoder.config, g.config, seed=p.seed, inject_res=p.inject_res).to(device)
    wt = p.loss
    image_loss = LossParams(l2=wt.l2, lpips=wt.lpips, id=wt.id, w_norm=wt.w_norm if p.train_encoder else 0.0,
                            latent=0.0)  # fmt: skip
    loss, status = build_loss(image_loss, job.pretrained, options)
    sampler = EditSampler(g, p.directions, options)
    trainer = FuserTrainer(
        FuserModel(encoder, fuser), g, loss, p, sampler, rank=rank, world=world, device=device
    )
    # the encoder by content, not path: the checkpoint is the same whichever checkout trained it
    source = {"sha256": job.encoder_sha256, "step": meta.get("step"), "generator": meta.get("generator")}
    extra = {"loss_status": {"active": status.active, "off": status.off}, "encoder_source": source}
    _train(job, trainer, g, rank, world, device, extra)


def _train(job: TrainJob, trainer, g, rank: int, world: int, device, extra_state: dict) -> None:
    """Restores the latest checkpoint, trains to the end, reports and checkpoints (rank 0 writes)."""
    import ray.train
    import torch.distributed as dist
    from PIL import Image

    from mambastyle.data.shards import manifest_shards
    from mambastyle.train.data import Prefetcher, ShardStream
    from mambastyle.train.loop import run
    from mambastyle.visual import make_grid, to_uint8

    p, options = job.train, job.storage.options()
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_state_dict(read_checkpoint(os.path.join(d, STATE_FILE)))
        start = trainer.step
        log.info("rank %d: resumed at step %d", rank, start)

    real_batches = None
    if any(not trainer.is_synthetic(s) for s in range(p.steps)):
        stream = ShardStream(
            manifest_shards(job.location(), "train"), rank, world, seed=p.seed, options=options
        )
        real_batches = lambda position: Prefetcher(lambda: stream.batches(p.batch_size, position))  # noqa: E731
    shown = _val_images(job, *trainer.shown_images()) if rank == 0 else None

    artifacts = job.artifacts
    history = _metrics_history(artifacts.join("metrics.jsonl"), start) if rank == 0 else []
    window: list[dict] = []
    generator_id = {"sha256": state_sha256(g), "resolution": g.resolution, "n_styles": g.n_styles}
    t_last = time.perf_counter()

    def report(trainer, metrics: dict, final: bool = False) -> None:
        nonlocal t_last
        step = trainer.step
        due_ckpt = final or step % p.checkpoint_every == 0
        due_eval = final or step % p.eval_every == 0
        if not (final or due_ckpt or due_eval or step % p.log_every == 0):
            return
        out: dict = {"step": step, "start_step": start, "world_size": world, "nonfinite": trainer.nonfinite}
        if window:
            for key in window[-1]:
                values = [m[key] for m in window if key in m]
                out[key] = sum(values) / len(values)
            now = time.perf_counter()
            out["steps_per_s"] = len(window) / max(1e-9, now - t_last)
            t_last = now
        window.clear()
        if due_ckpt and world > 1:
            # DDP replicas must hold identical weights; a checkpoint is rank 0's copy only.
            # (BatchNorm statistics differ until DDP re-broadcasts them from rank 0 at the
            # next forward, so parameters are compared.)
            total = sum(t.detach().double().sum() for t in trainer.module.parameters())
            digest = torch.tensor([float(total)], dtype=torch.float64, device=device)
            gathered = [torch.zeros_like(digest) for _ in range(world)]
            dist.all_gather(gathered, digest)
            if any(not torch.equal(g_, digest) for g_ in gathered):
                raise RuntimeError(f"step {step}: DDP replicas diverged ({[float(g_) for g_ in gathered]})")
            out["replicas_in_sync"] = 1.0
        ckpt = None
        if rank == 0:
            if due_eval:
                out.update(trainer.evaluate(shown))
            if shown is not None and (final or (p.image_every and step % p.image_every == 0)):
                grid = make_grid(to_uint8(trainer.reconstructions(shown)), ncols=trainer.grid_columns)
                buf = io.BytesIO()
                Image.fromarray(grid).save(buf, format="PNG")
                write_bytes(artifacts.join("images", f"recon-{step:06d}.png"), buf.getvalue(), durable=False)
            history.append(out)
            lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in history)
            write_bytes(artifacts.join("metrics.jsonl"), lines.encode(), durable=False)
            if due_ckpt:
                tmp = tempfile.mkdtemp(prefix="mambastyle-ckpt-")
                state = trainer.state_dict()
                state["generator"] = generator_id
                state.update(extra_state)
                torch.save(state, os.path.join(tmp, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
        name = f"checkpoint_{step:08d}" if due_ckpt else None
        ray.train.report(out, checkpoint=ckpt, checkpoint_dir_name=name,
                         delete_local_checkpoint_after_upload=ckpt is not None)  # fmt: skip

    def on_step(trainer, metrics: dict) -> None:
        window.append(metrics)
        report(trainer, metrics, final=trainer.step == p.steps)

    if trainer.step >= p.steps:  # a finished run, re-submitted: nothing to train
        ray.train.report({"step": trainer.step, "start_step": start, "world_size": world})
        return
    run(trainer, real_batches, [on_step])


def fit(job: TrainJob, worker=train_worker):
    """Runs the job (``train_worker`` or ``fuser_worker``) on the connected Ray cluster; returns
    Ray's Result (raises on failure)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    p = job.train
    ray_dir = job.location(job.runs_dir)
    if not ray_dir.is_s3:
        os.makedirs(ray_dir.path, exist_ok=True)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker={"CPU": p.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=job.run,
            storage_path=ray_dir.path,
            storage_filesystem=ray_dir.fs,
            failure_config=FailureConfig(max_failures=p.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    return trainer.fit()


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
        extra={"train": {"run": job.run, "params": state["params"], "loss_status": state.get("loss_status")}},
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
    info = {"run": job.run, "params": state["params"], "loss_status": state.get("loss_status"),
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


def write_run_records(job: TrainJob, out: Path) -> list[dict]:
    """The run's DVCLive records under ``out``: metrics per step (curves for ``dvc plots``), the
    final values and the last reconstruction picture; returns the metrics history."""
    from dvclive import Live

    from mambastyle.storage import list_files

    history = [
        json.loads(line) for line in read_bytes(job.artifacts.join("metrics.jsonl")).decode().splitlines()
    ]
    grids = sorted(p for p in list_files(job.artifacts.join("images")) if p.endswith(".png"))
    out.mkdir(parents=True, exist_ok=True)
    with Live(dir=str(out), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for record in history:
            live.step = record["step"]
            for key, value in sorted(record.items()):
                # timings stay in the run's metrics.jsonl: DVC-tracked outputs must not depend
                # on how busy the machine was
                if key not in ("step", "start_step", "steps_per_s") and isinstance(value, int | float):
                    live.log_metric(key, value)
    if grids:
        path = out / "plots" / "images" / "reconstruction.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(read_bytes(job.artifacts.join("images", grids[-1].rsplit("/", 1)[-1])))
    return history


def trained_encoder(params, manifest_bytes: bytes | None) -> tuple[Location, str]:
    """Where the train stage puts the encoder for these params: (location, URI as the params name it)."""
    parts = (RUNS_DIR, run_name(params.train, params.generator, manifest_bytes), "artifacts", "encoder.pt")
    root = resolve(params.storage.root, params.storage.options())
    return root.join(*parts), "/".join((params.storage.root.rstrip("/"), *parts))


def _shard_manifest(params, needs_real: bool, num_workers: int) -> tuple[Location, bytes | None]:
    """(the storage root, the shard manifest's bytes or None); when the run needs real images,
    a missing manifest or unreadable train shards fail here, before any worker starts."""
    from mambastyle.data.shards import ShardError, manifest_shards
    from mambastyle.train.data import ShardStream

    root = resolve(params.storage.root, params.storage.options())
    manifest_loc = root.join("shards", "manifest.json")
    manifest = read_bytes(manifest_loc) if exists(manifest_loc) else None
    if needs_real:
        if manifest is None:
            raise ShardError(f"no shard manifest at {manifest_loc.uri}: run the prepare stage first")
        ShardStream(manifest_shards(root, "train"), 0, num_workers)
    return root, manifest


def encoder_job(params) -> TrainJob:
    """The encoder training run these params describe."""
    tp = params.train
    root, manifest = _shard_manifest(params, tp.synthetic_ratio < 1.0, tp.num_workers)
    # Workers run elsewhere (another directory, another node): give them an absolute root.
    storage = dataclasses.replace(params.storage, root=root.uri)
    return TrainJob(tp, params.generator, storage, run_name(tp, params.generator, manifest))


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
    job = TrainJob(fp, params.generator, storage, run_name(fp, params.generator, manifest, extra),
                   runs_dir=FUSER_RUNS_DIR, encoder_uri=encoder_loc.uri, encoder_sha256=encoder_sha,
                   pretrained=params.train.pretrained)  # fmt: skip
    return job, {"uri": encoder_name, "sha256": encoder_sha}


def train_and_export(params, job: TrainJob, worker, export, local_out: Path, final_key: str):
    """A training stage's work: connects to the Ray of ``params.ray``, runs ``worker`` to the end
    (``fit``), exports the last checkpoint with ``export(job, state)``, writes the DVCLive records
    under ``local_out/dvclive`` and returns (the fields the stage's JSON record shares, export's
    metadata). The record names the file as ``storage.root`` does (a relative ``data/...`` stays
    relative), so it is the same in any checkout; its final metrics are the last report holding
    ``final_key``."""
    import posixpath

    from mambastyle.runtime import connect_ray

    connect_ray(params.ray.address, params.ray.num_cpus, params.ray.num_gpus)
    result = fit(job, worker)
    if result.checkpoint is None:
        raise RuntimeError(f"run {job.run} finished without a checkpoint")
    state = load_state(result.checkpoint)
    loc, sha, meta = export(job, state)
    history = write_run_records(job, local_out / "dvclive")
    final = next((m for m in reversed(history) if final_key in m), history[-1] if history else {})
    root = job.location()
    record = {
        "uri": posixpath.join(params.storage.root, loc.uri[len(root.uri) :].lstrip("/")),
        "sha256": sha,
        "run": job.run,
        "step": meta["step"],
        "generator": meta["generator"],
        "loss_status": state.get("loss_status"),
        "params": to_dict(job.train),
        "final_metrics": {k: v for k, v in final.items() if k.startswith(("eval/", "loss/"))},
    }
    return record, meta
