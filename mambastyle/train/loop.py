"""The encoder training step and loop: plain PyTorch, no Ray inside.

A :class:`Trainer` owns the encoder (possibly DDP-wrapped), the frozen generator, the loss,
the optimizer, LR schedule, AMP scaler and optional EMA. Steps come in two kinds, mixed
deterministically by ``synthetic_ratio``:

- **synthetic**: W+ codes sampled from the generator's mapping network (truncation, style
  mixing) are rendered; the encoder must recover the image *and* the code (latent loss);
- **real**: aligned images from the shards (random flips).

All randomness of step ``s`` on rank ``r`` comes from a generator seeded by
``(seed, r, s)``, and real data is addressed by sample position, so a checkpoint
(:meth:`Trainer.state_dict`) resumes a run to exactly the results it would have had.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mambastyle.config import TrainParams, to_dict
from mambastyle.models.encoders import Encoder
from mambastyle.models.stylegan2 import Generator
from mambastyle.train.losses import TrainingLoss

log = logging.getLogger(__name__)

STATE_FORMAT = "mambastyle-train-state"
STATE_VERSION = 2  # 2: the published encoder layouts; latent_avg beside the weights


class TrainingDiverged(RuntimeError):
    """Too many steps had a non-finite loss or gradient."""


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), antialiased bilinear (identity when already that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def step_seed(seed: int, rank: int, step: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{purpose}/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def sample_w_plus(
    g: Generator, n: int, truncation: float, mixing: float, rng: torch.Generator
) -> torch.Tensor:
    """(n, n_styles, D) codes: mapped z, truncated, and with probability ``mixing`` switched to
    a second code from a random layer on. Consumes the same random numbers whatever the
    probabilities, so a run's stream of draws does not depend on them."""
    s, d, dev = g.n_styles, g.style_dim, g.latent_avg.device
    z = torch.randn(2, n, d, generator=rng)
    mix = torch.rand(n, generator=rng) < mixing
    cut = torch.randint(1, max(2, s), (n,), generator=rng)
    w = g.mapping(z.view(2 * n, d).to(dev), truncation).view(2, n, d)
    switch = (mix[:, None] & (torch.arange(s)[None, :] >= cut[:, None])).to(dev)  # (n, S)
    return torch.where(switch[..., None], w[1][:, None, :], w[0][:, None, :]).contiguous()


class Trainer:
    """One worker's training state and step (see the module doc)."""

    def __init__(
        self,
        encoder: nn.Module,
        generator: Generator,
        loss: TrainingLoss,
        params: TrainParams,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.model = encoder  # what the step calls (may be DDP-wrapped)
        self.module: Encoder = unwrap(encoder)
        self.generator = generator.requires_grad_(False).eval()
        self.loss = loss.to(device)
        self.params = params
        self.rank = rank
        self.device = torch.device(device)
        # what the model sees: the encoder's input size (a fuser model reports its encoder's)
        self.input_size: int = getattr(self.module, "input_size", None) or self.module.config.input_size
        opt = params.optimizer
        self.trainable = [t for t in self.trainable_parameters() if t.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, params.steps, opt.warmup_steps, opt.min_lr_ratio)
        )
        cuda_amp = params.amp and self.device.type == "cuda"
        self.amp_dtype = None
        if cuda_amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema: Encoder | None = None
        if getattr(params, "ema_decay", 0.0) > 0:
            self.ema = copy.deepcopy(self.module).eval().requires_grad_(False)
        self.step = 0
        self.real_samples = 0  # position in this rank's real-image stream
        self.nonfinite = 0
        self._eval_set: tuple[torch.Tensor, torch.Tensor] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates (the whole encoder here)."""
        return list(self.module.parameters())

    # ------------------------------------------------------------------ step

    def is_synthetic(self, step: int) -> bool:
        """Step kinds interleave evenly: ``synthetic_ratio`` of every run of steps is synthetic."""
        r = self.params.synthetic_ratio
        return math.floor((step + 1) * r) > math.floor(step * r)

    def _rng(self, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(step_seed(self.params.seed, self.rank, self.step, purpose))

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _render(self, w_plus: torch.Tensor) -> torch.Tensor:
        return resize(self.generator.synthesis(w_plus, noise_mode="const"), self.input_size)

    def train_step(self, real: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step; ``real`` is a (B, 3, H, W) uint8 batch on real steps.

        Returns the step's metrics (loss terms, total, grad norm, lr, kind). A step whose
        loss or gradient is not finite changes no weights and is counted; more than
        ``max_nonfinite`` of them raise :class:`TrainingDiverged`.
        """
        p = self.params
        synthetic = self.is_synthetic(self.step)
        self.model.train()
        if not synthetic and real is None:
            raise ValueError(f"step {self.step} is a real-image step but no batch was given")
        # A skipped step must leave no trace, including BatchNorm statistics of a bad batch.
        saved_buffers = [b.detach().clone() for b in self.module.buffers()]
        total, terms = self.compute_loss(synthetic, real)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.sync_gradients()
        self.scaler.unscale_(self.optimizer)
        clip = p.optimizer.grad_clip if p.optimizer.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        finite = torch.isfinite(total.detach()) & torch.isfinite(grad_norm)
        if dist.is_available() and dist.is_initialized():  # every rank must take the same decision
            flag = finite.to(torch.float32).to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        lr = self.optimizer.param_groups[0]["lr"]
        if bool(finite):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._update_ema()
        else:
            with torch.no_grad():
                for b, saved in zip(self.module.buffers(), saved_buffers, strict=True):
                    b.copy_(saved)
            self.nonfinite += 1
            log.warning(
                "step %d: non-finite loss or gradient, skipped (%d so far)", self.step, self.nonfinite
            )
            if self.nonfinite > p.max_nonfinite:
                raise TrainingDiverged(
                    f"{self.nonfinite} steps had a non-finite loss or gradient (max_nonfinite="
                    f"{p.max_nonfinite}); last at step {self.step}. Lower the learning rate or check "
                    "the data."
                )
        self.scheduler.step()
        self.step += 1
        return {
            **{f"loss/{k}": v for k, v in terms.items()},
            "loss/total": float(total.detach()),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "synthetic": float(synthetic),
            "skipped": float(not bool(finite)),
        }

    def real_images(self, real: torch.Tensor) -> torch.Tensor:
        """A real uint8 batch as encoder input: [-1, 1], resized, randomly flipped (``flip``)."""
        p = self.params
        x = resize(to_unit_range(real.to(self.device)), self.input_size)
        if p.flip:
            flip = (torch.rand(x.shape[0], generator=self._rng("flip")) < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        self.real_samples += real.shape[0]
        return x

    def compute_loss(
        self, synthetic: bool, real: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss: a rendered generator sample (known code) or a real batch."""
        p = self.params
        w_true = None
        if synthetic:
            w_true = sample_w_plus(self.generator, p.batch_size, p.synthetic.truncation,
                                   p.synthetic.mixing, self._rng("synthetic"))  # fmt: skip
            with torch.no_grad():
                x = self._render(w_true)
        else:
            x = self.real_images(real)
        with self._autocast():
            w_hat = self.model(x)
            y_hat = self._render(w_hat)
            return self.loss(y_hat.float(), x, w_hat.float(), self.module.latent_avg, w_true)

    def sync_gradients(self) -> None:
        """Averages gradients over the workers when the model is not DDP-wrapped (DDP does it)."""

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.params.ema_decay
        for e, m in zip(self.ema.parameters(), self.module.parameters(), strict=True):
            e.lerp_(m.detach(), 1.0 - decay)
        for e, m in zip(self.ema.buffers(), self.module.buffers(), strict=True):
            e.copy_(m)

    @property
    def export_model(self) -> Encoder:
        """The weights a user gets: the EMA when enabled, else the trained encoder."""
        return self.ema if self.ema is not None else self.module

    # ------------------------------------------------------------------ evaluation

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out synthetic (W+, image) pairs, fixed for the run (never used for training)."""
        if self._eval_set is None:
            p = self.params
            rng = torch.Generator().manual_seed(step_seed(p.seed, -1, -1, "eval"))
            w = sample_w_plus(self.generator, p.eval_samples, p.synthetic.truncation, p.synthetic.mixing, rng)
            with torch.no_grad():
                self._eval_set = (w, self._render(w))
        return self._eval_set

    @torch.no_grad()
    def evaluate(self, real: torch.Tensor | None = None) -> dict[str, float]:
        """Latent recovery on the held-out synthetic set, image MSE there and on ``real``.

        Recovery is measured on W+ and on the style codes the generator derives from it
        (:meth:`Generator.style_codes`), each as MSE and relative to the MSE of always
        answering ``latent_avg`` (``*_rel``: 1 = no better than the average face, 0 = exact).
        In W+, directions a layer's projection ignores cannot be recovered from any image,
        so ``style_rel`` is the measure of what an encoder can learn."""
        model = self.export_model
        was_training = model.training
        model.eval()
        w, x = self.eval_set()
        w_hat = torch.cat([model(x[i : i + 16]) for i in range(0, x.shape[0], 16)])
        avg = self.module.latent_avg.expand_as(w)
        latent_mse = F.mse_loss(w_hat, w)
        s_true, styles = self.generator.style_codes(w), self.generator.style_codes
        style_mse = F.mse_loss(styles(w_hat), s_true)
        out = {
            "eval/latent_mse": float(latent_mse),
            "eval/latent_rel": float(latent_mse / F.mse_loss(avg, w)),
            "eval/style_mse": float(style_mse),
            "eval/style_rel": float(style_mse / F.mse_loss(styles(avg), s_true)),
            "eval/synthetic_mse": float(F.mse_loss(self._render(w_hat), x)),
        }
        if real is not None and real.shape[0] > 0:
            xr = resize(to_unit_range(real.to(self.device)), self.input_size)
            out["eval/real_mse"] = float(F.mse_loss(self._render(model(xr)), xr))
        model.train(was_training)
        return out

    @torch.no_grad()
    def reconstructions(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) uint8 -> (2n, 3, S, S) in [-1, 1]: each input followed by its reconstruction."""
        model = self.export_model
        was_training = model.training
        model.eval()
        x = resize(to_unit_range(images.to(self.device)), self.input_size)
        y = self._render(model(x))
        model.train(was_training)
        return torch.stack([x, y], dim=1).flatten(0, 1).cpu()

    # ------------------------------------------------------------------ state

    STATE_FORMAT = STATE_FORMAT
    grid_columns = 4  # reconstruction pictures: two (input, reconstruction) pairs per row

    def shown_images(self) -> tuple[int, tuple[str, ...]]:
        """How many real faces :meth:`evaluate` and the pictures use, and from which splits in
        turn: the val split topped up from train."""
        return 8, ("val", "train")

    def model_state(self) -> dict:
        """The trained weights and their architecture (part of :meth:`state_dict`)."""
        return {
            "encoder_config": self.module.config.to_dict(),
            "encoder": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "encoder_latent_avg": self.module.latent_avg.detach().cpu().clone(),  # not among the weights
            "ema": None if self.ema is None else {k: v.cpu() for k, v in self.ema.state_dict().items()},
        }

    def load_model_state(self, state: dict) -> None:
        if state["encoder_config"] != self.module.config.to_dict():
            raise ValueError("the training state was saved for a different encoder architecture")
        self.module.load_state_dict(state["encoder"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"] if state["ema"] is not None else state["encoder"])

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (plain types and tensors: ``weights_only``-safe)."""
        return {
            "format": self.STATE_FORMAT,
            "version": STATE_VERSION,
            "step": self.step,
            "real_samples": self.real_samples,
            "nonfinite": self.nonfinite,
            **self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "params": to_dict(self.params),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != self.STATE_FORMAT or state.get("version") != STATE_VERSION:
            found = f"format {state.get('format')!r}, version {state.get('version')!r}"
            raise ValueError(f"not a {self.STATE_FORMAT} ({found})")
        self.load_model_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.real_samples = int(state["real_samples"])
        self.nonfinite = int(state["nonfinite"])


Callback = Callable[[Trainer, dict[str, float]], None]


def run_steps(
    trainer: Trainer,
    real_batches: Callable[[int], Iterator[torch.Tensor]] | None = None,
    callbacks: Iterable[Callback] = (),
) -> Trainer:
    """Trains until ``params.steps``, from wherever ``trainer`` is (fresh or restored).

    ``real_batches(position)`` opens the real-image stream at a sample position (the
    trainer's ``real_samples``, so a restored run continues where it stopped); it may be
    None only when every step is synthetic. Each callback is called after every step.
    """
    steps = trainer.params.steps
    needs_real = any(not trainer.is_synthetic(s) for s in range(trainer.step, steps))
    if needs_real and real_batches is None:
        raise ValueError("synthetic_ratio < 1 needs real images, but there are none")
    batches = real_batches(trainer.real_samples) if needs_real else None
    try:
        while trainer.step < steps:
            real = None if trainer.is_synthetic(trainer.step) else next(batches)
            metrics = trainer.train_step(real)
            for callback in callbacks:
                callback(trainer, metrics)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return trainer
