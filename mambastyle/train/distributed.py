"""Ray Train wrapper: the training loop on N workers (DDP), checkpointed to local disk or S3.

Runs' identity, layout and exports are :mod:`mambastyle.runs`; this module starts the workers,
restores the latest checkpoint, trains and reports.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from mambastyle.checkpoints import read_checkpoint, state_sha256
from mambastyle.config import (
    FuserParams,
    to_dict,
)
from mambastyle.runs import STATE_FILE, TrainJob, load_state
from mambastyle.runtime import worker_env, worker_logging
from mambastyle.storage import Location, exists, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)


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
    worker_logging()
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

    from mambastyle.layers.ss2d import describe_scan
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
    log.info("rank %d: %s", rank, describe_scan(encoder, device))
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
    from mambastyle.models.fuser import FuserModel, build_fuser
    from mambastyle.train.fuser import EditSampler, FuserTrainer
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


def _assert_replicas_in_sync(module, world: int, device, step: int) -> None:
    """DDP replicas must hold identical weights, since a checkpoint is rank 0's copy only.

    Parameters are compared, not buffers: BatchNorm statistics differ until DDP re-broadcasts
    them from rank 0 at the next forward.
    """
    import torch.distributed as dist

    total = sum(t.detach().double().sum() for t in module.parameters())
    digest = torch.tensor([float(total)], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g_, digest) for g_ in gathered):
        raise RuntimeError(f"step {step}: DDP replicas diverged ({[float(g_) for g_ in gathered]})")


def _write_grid(loc, trainer, shown) -> None:
    """The reconstructions of the shown images as one PNG grid."""
    from PIL import Image

    from mambastyle.visual import make_grid, to_uint8

    grid = make_grid(to_uint8(trainer.reconstructions(shown)), ncols=trainer.grid_columns)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    write_bytes(loc, buf.getvalue(), durable=False)


def _local_checkpoint(state: dict):
    """A Ray Train checkpoint in a fresh local folder (Ray uploads it and deletes the folder)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="mambastyle-ckpt-")
    torch.save(state, os.path.join(tmp, STATE_FILE))
    return ray.train.Checkpoint.from_directory(tmp)


def _train(job: TrainJob, trainer, g, rank: int, world: int, device, extra_state: dict) -> None:
    """Restores the latest checkpoint, trains to the end, reports and checkpoints (rank 0 writes)."""
    import ray.train

    from mambastyle.data.shards import manifest_shards
    from mambastyle.train.data import Prefetcher, ShardStream
    from mambastyle.train.loop import run_steps

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
            _assert_replicas_in_sync(trainer.module, world, device, step)
            out["replicas_in_sync"] = 1.0
        ckpt = None
        if rank == 0:
            if due_eval:
                out.update(trainer.evaluate(shown))
            if shown is not None and (final or (p.image_every and step % p.image_every == 0)):
                _write_grid(artifacts.join("images", f"recon-{step:06d}.png"), trainer, shown)
            history.append(out)
            lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in history)
            write_bytes(artifacts.join("metrics.jsonl"), lines.encode(), durable=False)
            if due_ckpt:
                state = trainer.state_dict() | {"generator": generator_id, **extra_state}
                ckpt = _local_checkpoint(state)
        name = f"checkpoint_{step:08d}" if due_ckpt else None
        ray.train.report(out, checkpoint=ckpt, checkpoint_dir_name=name,
                         delete_local_checkpoint_after_upload=ckpt is not None)  # fmt: skip

    def on_step(trainer, metrics: dict) -> None:
        window.append(metrics)
        report(trainer, metrics, final=trainer.step == p.steps)

    if trainer.step >= p.steps:  # a finished run, re-submitted: nothing to train
        ray.train.report({"step": trainer.step, "start_step": start, "world_size": world})
        return
    run_steps(trainer, real_batches, [on_step])


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
            name=job.run_id,
            storage_path=ray_dir.path,
            storage_filesystem=ray_dir.fs,
            failure_config=FailureConfig(max_failures=p.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    return trainer.fit()


def write_run_records(job: TrainJob, curves: Path, picture: Path) -> list[dict]:
    """The run's local records: one ``{curves}/{metric}.tsv`` per metric (``step`` and the value per
    logged step, the curves ``dvc plots`` draws; ``loss/l2`` -> ``loss/l2.tsv``) and the last
    reconstruction grid at ``picture``; returns the metrics history."""
    from mambastyle.storage import list_files

    history = [
        json.loads(line) for line in read_bytes(job.artifacts.join("metrics.jsonl")).decode().splitlines()
    ]
    series: dict[str, list[str]] = {}
    for record in history:
        for key, value in sorted(record.items()):
            # timings stay in the run's metrics.jsonl: DVC-tracked outputs must not depend on how
            # busy the machine was
            if key not in ("step", "start_step", "steps_per_s") and isinstance(value, int | float):
                series.setdefault(key, []).append(f"{record['step']}\t{value!r}\n")
    if curves.is_dir():  # a metric the run no longer logs must not leave its old curve behind
        for old in curves.rglob("*.tsv"):
            old.unlink()
    for key, rows in series.items():
        path = curves / f"{key}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"step\t{key.rsplit('/', 1)[-1]}\n" + "".join(rows))
    grids = sorted(p for p in list_files(job.artifacts.join("images")) if p.endswith(".png"))
    if grids:
        picture.parent.mkdir(parents=True, exist_ok=True)
        picture.write_bytes(read_bytes(job.artifacts.join("images", grids[-1].rsplit("/", 1)[-1])))
    return history


def headline_metrics(record: dict, keys: tuple[str, ...]) -> dict:
    """The step and the final ``keys`` (``eval/...``, ``loss/...``) of ``train_and_export``'s
    record, grouped by kind: the few figures experiments are compared on."""
    final = record.get("final_metrics", {})
    head: dict = {"step": record["step"]}
    for key in keys:
        if key in final:
            group, _, name = key.partition("/")
            head.setdefault(group, {})[name] = final[key]
    return head


def train_and_export(params, job: TrainJob, worker, export, local_out: Path, curves: Path, final_key: str):
    """A training stage's work: connects to the Ray of ``params.ray``, runs ``worker`` to the end
    (``fit``), exports the last checkpoint with ``export(job, state)``, writes the curves under
    ``curves`` and the last picture as ``local_out/reconstruction.png`` and returns (the fields
    the stage's JSON record shares, export's metadata). The record names the file as
    ``storage.root`` does (a relative ``data/...`` stays relative), so it is the same in any
    checkout; its final metrics are the last report holding ``final_key``."""
    import posixpath

    from mambastyle.runtime import connect_ray

    connect_ray(params.ray.address, params.ray.num_cpus, params.ray.num_gpus)
    result = fit(job, worker)
    if result.checkpoint is None:
        raise RuntimeError(f"run {job.run_id} finished without a checkpoint")
    state = load_state(result.checkpoint)
    loc, sha, meta = export(job, state)
    history = write_run_records(job, curves, local_out / "reconstruction.png")
    final = next((m for m in reversed(history) if final_key in m), history[-1] if history else {})
    root = job.location()
    record = {
        "uri": posixpath.join(params.storage.root, loc.uri[len(root.uri) :].lstrip("/")),
        "sha256": sha,
        "run": job.run_id,
        "step": meta["step"],
        "generator": meta["generator"],
        "loss_status": state.get("loss_status"),
        "params": to_dict(job.train),
        "final_metrics": {k: v for k, v in final.items() if k.startswith(("eval/", "loss/"))},
    }
    return record, meta
