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
from mambastyle.config import GeneratorParams, StorageParams, TrainParams, to_dict
from mambastyle.storage import Location, exists, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RUNS_DIR = "train-runs"  # under storage.root


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs (plain, picklable): the params sections and where data lives."""

    train: TrainParams
    generator: GeneratorParams
    storage: StorageParams
    run: str

    @property
    def root(self) -> str:
        return self.storage.root

    def location(self, *parts: str) -> Location:
        return resolve(self.root, self.storage.options()).join(*parts)

    @property
    def artifacts(self) -> Location:
        return self.location(RUNS_DIR, self.run, "artifacts")


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


def run_name(train: TrainParams, generator: GeneratorParams, manifest: bytes | None) -> str:
    """A run id from the inputs (params, shard manifest, code): same inputs -> same run
    (resumed), any change -> a new one."""
    h = hashlib.sha256(code_hash().encode())
    h.update(
        json.dumps({"train": to_dict(train), "generator": generator.identity()}, sort_keys=True).encode()
    )
    h.update(manifest or b"no-real-data")
    return f"run-{h.hexdigest()[:16]}"


def _metrics_history(loc: Location, upto: int) -> list[dict]:
    """Saved report lines with ``step <= upto`` (steps after a restored checkpoint are dropped)."""
    if not exists(loc):
        return []
    lines = [json.loads(line) for line in read_bytes(loc).decode().splitlines() if line.strip()]
    return [m for m in lines if m["step"] <= upto]


def _val_images(job: TrainJob, n: int) -> torch.Tensor | None:
    """Up to ``n`` real images for evaluation and pictures: the val split, topped up from train."""
    from mambastyle.train.data import ShardError, ShardStream, manifest_shards

    root = resolve(job.root, job.storage.options())
    images: list[torch.Tensor] = []
    for split in ("val", "train"):
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


def train_worker(config: dict) -> None:
    """``train_loop_per_worker``: builds everything, restores the latest checkpoint, trains."""
    import ray.train
    import torch.distributed as dist
    from PIL import Image
    from torch.nn.parallel import DistributedDataParallel

    from mambastyle.generate import resolve_generator
    from mambastyle.models.encoders import build_encoder
    from mambastyle.train.data import Prefetcher, ShardStream, manifest_shards
    from mambastyle.train.loop import Trainer, run
    from mambastyle.train.losses import build_loss
    from mambastyle.visual import make_grid, to_uint8

    job: TrainJob = config["job"]
    p, options = job.train, job.storage.options()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(p.cpus_per_worker)
    device = ray.train.torch.get_device() if p.use_gpu else torch.device("cpu")

    g = resolve_generator(job.generator.checkpoint, job.generator.architecture, job.generator.init_seed,
                          job.generator.latent_avg_samples, device=device, options=options)  # fmt: skip
    encoder = build_encoder(
        p.encoder, g.resolution, seed=p.seed, input_size=p.input_size, style_dim=g.style_dim
    )
    encoder = encoder.to(device)
    encoder.set_latent_avg(g.latent_avg)
    loss, status = build_loss(p.loss, p.pretrained, options)
    if hasattr(encoder, "feature_adapter"):
        # Only the F-space path uses it; W+ training never does, and DDP refuses parameters
        # that get no gradient (unless it searches for them every step).
        encoder.feature_adapter.requires_grad_(False)
    model = encoder
    if world > 1:
        model = DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(model, g, loss, p, rank=rank, device=device)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_state_dict(read_checkpoint(os.path.join(d, STATE_FILE)))
        start = trainer.step
        log.info("rank %d: resumed at step %d", rank, start)

    real_batches = None
    if p.synthetic_ratio < 1.0:
        stream = ShardStream(
            manifest_shards(job.location(), "train"), rank, world, seed=p.seed, options=options
        )
        real_batches = lambda position: Prefetcher(lambda: stream.batches(p.batch_size, position))  # noqa: E731
    shown = _val_images(job, 8) if rank == 0 else None

    artifacts = job.artifacts
    history = _metrics_history(artifacts.join("metrics.jsonl"), start) if rank == 0 else []
    window: list[dict] = []
    generator_id = {"sha256": state_sha256(g), "resolution": g.resolution, "n_styles": g.n_styles}
    t_last = time.perf_counter()

    def report(trainer: Trainer, metrics: dict, final: bool = False) -> None:
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
                grid = make_grid(to_uint8(trainer.reconstructions(shown)), ncols=4)
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
                state["loss_status"] = {"active": status.active, "off": status.off}
                torch.save(state, os.path.join(tmp, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
        name = f"checkpoint_{step:08d}" if due_ckpt else None
        ray.train.report(out, checkpoint=ckpt, checkpoint_dir_name=name,
                         delete_local_checkpoint_after_upload=ckpt is not None)  # fmt: skip

    def on_step(trainer: Trainer, metrics: dict) -> None:
        window.append(metrics)
        report(trainer, metrics, final=trainer.step == p.steps)

    if trainer.step >= p.steps:  # a finished run, re-submitted: nothing to train
        ray.train.report({"step": trainer.step, "start_step": start, "world_size": world})
        return
    run(trainer, real_batches, [on_step])


def fit(job: TrainJob):
    """Runs the job on the connected Ray cluster; returns Ray's Result (raises on failure)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    p = job.train
    ray_dir = job.location(RUNS_DIR)
    if not ray_dir.is_s3:
        os.makedirs(ray_dir.path, exist_ok=True)
    trainer = TorchTrainer(
        train_worker,
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
            worker_runtime_env={"env_vars": _worker_env()},
        ),
    )
    return trainer.fit()


def _worker_env() -> dict[str, str]:
    """Environment the workers inherit from the driver (allocator settings, Ray on loopback)."""
    keys = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
    return {k: os.environ[k] for k in keys if k in os.environ}


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
