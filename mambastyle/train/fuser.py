"""Fuser training: the F-space correction learned on synthetic edit pairs and real inversions.

Steps come in two kinds (``fuser.real_every``):

- **edit** (synthetic): W+ codes ``w`` sampled from the generator, an edit ``d`` from the
  configured families with a random strength, ``x = G(w)`` and ``x_e = G(w + d)`` rendered.
  The encoder sees ``x`` (code ``w_hat``, features ``C``); the output
  ``G(w_hat + d, offset = fuser(C, d))`` must match ``x_e`` (pixel, LPIPS, identity), and the
  correction must match what ``w_hat`` misses at the injected block,
  ``feat_G(w + d) - feat_G(w_hat + d)`` (feature term). With a cycle weight, the edited output
  is re-encoded, the edit undone (``-d``) and the result compared with ``x``.
- **real**: a real batch is inverted with a zero direction and compared with itself.

The encoder is frozen (its BatchNorm statistics too) unless ``fuser.train_encoder``; its
feature adapter, the layer that exists only for the F-space path, always trains with the fuser.
Without DDP wrapping (a step may run the encoder twice), gradients are averaged over the
workers by hand and the encoder's buffers broadcast from rank 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mambastyle.config import FuserDirectionParams, FuserParams
from mambastyle.models.fuser import FuserModel, fused_synthesis
from mambastyle.models.stylegan2 import Generator
from mambastyle.storage import StorageOptions
from mambastyle.train.loop import Trainer, resize, sample_w_plus, step_seed, to_unit_range
from mambastyle.train.losses import TrainingLoss

STATE_FORMAT = "mambastyle-fuser-train-state"


def image_with_fuser(
    generator: Generator, model: FuserModel, x: torch.Tensor, direction: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G(w_hat + d, offset = fuser(C, d))`` for images ``x`` (d = 0 when None): (image, w_hat)."""
    w_hat, features = model.encoder(x, return_features=True)
    code = w_hat if direction is None else w_hat + direction
    return fused_synthesis(generator, model.fuser, code, features, direction), w_hat


class EditSampler:
    """Draws per-sample edits ``d`` (B, n_styles, D) from the configured families.

    ``ganspace`` and ``random`` strengths are in standard deviations of W along the direction,
    measured once on 4096 fixed-seed samples of the mapping network.
    """

    def __init__(
        self,
        generator: Generator,
        families: tuple[FuserDirectionParams, ...],
        options: StorageOptions | None = None,
    ):
        from mambastyle.directions import check_layers, load_direction, load_ganspace

        self.generator = generator
        self.families = families
        s, d = generator.n_styles, generator.style_dim
        self.layers = [check_layers(f.layers, s) for f in families]
        with torch.no_grad():
            z = torch.randn(4096, d, generator=torch.Generator().manual_seed(0)).to(
                generator.latent_avg.device
            )
            self.w_samples = generator.mapping(z).cpu().double()  # (4096, D)
        self.vectors: list[torch.Tensor | None] = []  # (S, D) per file family; None for random
        for f in families:
            if f.source == "interfacegan":
                self.vectors.append(torch.from_numpy(load_direction(f.uri, s, d, options).vector).float())
            elif f.source == "ganspace":
                g = load_ganspace(f.uri, f.component, s, d, options)
                step = torch.from_numpy(np.asarray(g.component, dtype=np.float32) * np.float32(g.std))
                self.vectors.append(step.expand(s, d).clone())
            else:
                self.vectors.append(None)

    def _std_along(self, u: torch.Tensor) -> torch.Tensor:
        """(B, D) unit directions -> (B,) standard deviation of W along each."""
        return (self.w_samples @ u.double().t()).std(dim=0).float()

    def sample(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """(n, n_styles, D) edits on the generator's device. Consumes the same draws whatever the families."""
        s, d = self.generator.n_styles, self.generator.style_dim
        which = torch.randint(0, len(self.families), (n,), generator=rng)
        u01 = torch.rand(n, generator=rng)
        u = F.normalize(torch.randn(n, d, generator=rng), dim=1)
        out = torch.zeros(n, s, d)
        std = self._std_along(u)
        for i in range(n):
            k = int(which[i])
            f, (start, stop) = self.families[k], self.layers[k]
            strength = f.strength[0] + (f.strength[1] - f.strength[0]) * float(u01[i])
            vector = self.vectors[k]
            if vector is None:  # random: a unit direction in W, in standard deviations of W
                vector = (std[i] * u[i]).expand(s, d)
            out[i, start:stop] = strength * vector[start:stop]
        return out.to(self.generator.latent_avg.device)


class FuserTrainer(Trainer):
    """One worker's fuser training state and step (see the module doc)."""

    def __init__(
        self,
        model: FuserModel,
        generator: Generator,
        loss: TrainingLoss,
        params: FuserParams,
        sampler: EditSampler,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ):
        self.world = world
        if not params.train_encoder:
            model.encoder.requires_grad_(False)
            adapter = getattr(model.encoder, "feature_adapter", None)
            if adapter is not None:
                adapter.requires_grad_(True)
        super().__init__(model, generator, loss, params, rank=rank, device=device)
        self.module: FuserModel  # (not DDP-wrapped: the model itself)
        self.sampler = sampler

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [t for t in self.module.parameters() if t.requires_grad]

    def is_synthetic(self, step: int) -> bool:
        every = self.params.real_every
        return every == 0 or (step + 1) % every != 0

    def _set_modes(self) -> None:
        self.module.train()
        if not self.params.train_encoder:
            self.module.encoder.eval()  # frozen BatchNorm statistics

    def sync_gradients(self) -> None:
        if self.world <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self.trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t, g in zip(self.trainable, grads, strict=True):
            t.grad = flat[offset : offset + g.numel()].view_as(t).clone()
            offset += g.numel()

    def _broadcast_buffers(self) -> None:
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            for b in self.module.buffers():
                dist.broadcast(b, 0)

    def train_step(self, real: torch.Tensor | None = None) -> dict[str, float]:
        out = super().train_step(real)
        self._broadcast_buffers()
        return out

    def compute_loss(
        self, synthetic: bool, real: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        self._set_modes()
        g, res = self.generator, self.module.inject_res
        latent_avg = self.module.latent_avg
        if not synthetic:
            x = self.real_images(real)
            with self._autocast():
                y, w_hat = image_with_fuser(g, self.module, x)
                return self.loss(resize(y, self.input_size).float(), x, w_hat.float(), latent_avg)
        w = sample_w_plus(g, p.batch_size, p.synthetic.truncation, p.synthetic.mixing, self._rng("synthetic"))
        d = self.sampler.sample(p.batch_size, self._rng("edit"))
        with torch.no_grad():
            x = self._render(w)
            x_edit, feat_edit = g.synthesis(w + d, noise_mode="const", return_features_at=res)
            x_edit = resize(x_edit, self.input_size)
        with self._autocast():
            w_hat, offset = self.module(x, d)
            y, feat_hat = g.synthesis(w_hat + d, noise_mode="const", feature_offset=(res, offset),
                                      return_features_at=res)  # fmt: skip
            total, terms = self.loss(resize(y, self.input_size).float(), x_edit, w_hat.float(), latent_avg)
            wt = p.loss
            if wt.feature > 0:
                feature = F.smooth_l1_loss(offset.float(), (feat_edit - feat_hat).detach().float())
                total = total + wt.feature * feature
                terms["feature"] = float(feature.detach())
            if wt.cycle > 0:
                back, _ = image_with_fuser(g, self.module, resize(y, self.input_size), -d)
                cycle = F.mse_loss(resize(back, self.input_size).float(), x)
                total = total + wt.cycle * cycle
                terms["cycle"] = float(cycle.detach())
        return total, terms

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _eval_pairs(self, n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held-out synthetic edit pairs (x, d, x_edit), fixed for the run."""
        if self._eval_set is None:
            p = self.params
            rng = torch.Generator().manual_seed(step_seed(p.seed, -1, -1, "fuser-eval"))
            w = sample_w_plus(self.generator, n, p.synthetic.truncation, p.synthetic.mixing, rng)
            d = self.sampler.sample(n, rng)
            self._eval_set = (self._render(w), d, self._render(w + d))
        return self._eval_set

    @torch.no_grad()
    def evaluate(self, real: torch.Tensor | None = None) -> dict[str, float]:
        """MSE with and without the fuser: edits of held-out generator samples, and held-out real images."""
        was_training = self.module.training
        self.module.eval()
        g = self.generator
        x, d, x_edit = self._eval_pairs()
        y_fuser, w_hat = image_with_fuser(g, self.module, x, d)
        out = {
            "eval/edit_mse_wplus": float(F.mse_loss(self._render(w_hat + d), x_edit)),
            "eval/edit_mse_fuser": float(F.mse_loss(resize(y_fuser, self.input_size), x_edit)),
        }
        if real is not None and real.shape[0] > 0:
            xr = resize(to_unit_range(real.to(self.device)), self.input_size)
            y_fuser, w_hat = image_with_fuser(g, self.module, xr)
            out["eval/real_mse_wplus"] = float(F.mse_loss(self._render(w_hat), xr))
            out["eval/real_mse_fuser"] = float(F.mse_loss(resize(y_fuser, self.input_size), xr))
        self.module.train(was_training)
        return out

    @torch.no_grad()
    def reconstructions(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) uint8 -> (3n, 3, S, S): each input, its W+ reconstruction, with the fuser."""
        was_training = self.module.training
        self.module.eval()
        x = resize(to_unit_range(images.to(self.device)), self.input_size)
        y_fuser, w_hat = image_with_fuser(self.generator, self.module, x)
        y_fuser = resize(y_fuser, self.input_size)
        self.module.train(was_training)
        return torch.stack([x, self._render(w_hat), y_fuser], dim=1).flatten(0, 1).cpu()

    grid_columns = 6  # two (input, W+, fuser) triples per row

    def shown_images(self) -> tuple[int, tuple[str, ...]]:
        """Faces the fuser never trained on: val, then test."""
        return self.params.eval_images, ("val", "test")

    # ------------------------------------------------------------------ state

    STATE_FORMAT = STATE_FORMAT

    def model_state(self) -> dict:
        enc, fuser = self.module.encoder, self.module.fuser
        return {
            "encoder_config": enc.config.to_dict(),
            "encoder": {k: v.detach().cpu() for k, v in enc.state_dict().items()},
            "encoder_latent_avg": enc.latent_avg.detach().cpu().clone(),  # not among the weights
            "fuser_config": fuser.config.to_dict(),
            "fuser": {k: v.detach().cpu() for k, v in fuser.state_dict().items()},
            "ema": None,
        }

    def load_model_state(self, state: dict) -> None:
        if state.get("fuser_config") != self.module.fuser.config.to_dict():
            raise ValueError("the training state was saved for a different fuser architecture")
        if state.get("encoder_config") != self.module.encoder.config.to_dict():
            raise ValueError("the training state was saved for a different encoder architecture")
        self.module.encoder.load_state_dict(state["encoder"])
        self.module.fuser.load_state_dict(state["fuser"])
