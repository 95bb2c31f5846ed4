"""Stage 4: a generator that maps a query embedding to the weights of the edit's neuron.

The DiT (``dit.py``) denoises a normalised weight vector conditioned on the query embedding; all diffusion math (noise
schedule, training target, sampler) lives in diffusers schedulers. ``hp.generator == "mlp"`` swaps in the paper's
ablation: an MLP that regresses the weights directly.

Sampling is a deterministic function of the query alone: every query starts from the same stored noise vector (and,
for the ancestral DDPM sampler, sees the same per-step noise), so its weights never depend on what else is in the
batch; a fresh scheduler per call keeps concurrent calls from sharing scheduler state.

Data-parallel training follows DDP (``megedit.training``): every rank draws the same batches and the same noise,
trains on its own slice of each batch, and the gradients are averaged, so each optimiser step is the single-process one.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import compute_density_for_timestep_sampling
from tqdm.auto import tqdm

from . import distributed
from .dit import DiT
from .training import TrainingState, backward_on_shard, start_in_sync

# the divergence check averages the epoch losses of at least this many training rows: the loss of one row swings with
# its random timestep and noise, and a mean over this many keeps those swings far below the rise the check looks for
DIVERGENCE_ROWS = 2000


def loss_rose(losses: list[float], window: int, ratio: float) -> bool:
    """Whether the mean of the last ``window`` epoch losses is above ``ratio`` times the lowest such mean before it
    (never with ``ratio`` 0). A generator whose learning rate is too high for its number of edits shows it this way
    long before its schedule ends: at 9,921 CounterFact edits, gen_lr 4e-3 went from 0.70 in epoch 44 to 0.97 in
    epoch 54 (bench/results/counterfact_meg_10k_lr4e-3_stopped)."""
    if ratio <= 0 or len(losses) <= window:
        return False
    means = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
    return means[-1] > ratio * min(means[:-1])


class MLPGenerator(nn.Module):
    """The paper's no-diffusion ablation: query embedding -> normalised weight vector in one forward pass."""

    def __init__(self, cond_dim: int, vector_size: int, hidden: int = 256, depth: int = 4):
        super().__init__()
        layers = [nn.Linear(cond_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, vector_size)
        nn.init.zeros_(self.out.weight)  # start at the mean target, as the DiT does
        nn.init.zeros_(self.out.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(cond))  # (N, P)


def noise_schedule(hp) -> dict:
    """The diffusers config shared by the training (DDPM) and the sampling (DDIM or DDPM) scheduler."""
    return dict(
        num_train_timesteps=hp.gen_train_timesteps, beta_schedule=hp.gen_beta_schedule,
        prediction_type=hp.gen_prediction_type,
        clip_sample=False,  # normalised weights are not images in [-1, 1]
        # Sampling starts from pure noise, so the last training timestep should be pure noise too (Lin et al. 2024,
        # "Common diffusion noise schedules and sample steps are flawed"); epsilon prediction is undefined there.
        rescale_betas_zero_snr=hp.gen_prediction_type != "epsilon",
        timestep_spacing="trailing",  # few-step sampling must start at the last timestep, not at T - T/steps
    )


class NeuronGenerator(nn.Module):
    """Stage 4: query embeddings (N, cond_dim) -> neuron weights (N, vector_size), trained on stage 3's neurons.

    Everything sampling needs (network, normalisation, starting noise) is in the state_dict; the architecture, the noise
    schedule, the sampler and the DDPM sampler's per-step seeds come from ``hp`` at construction.
    """

    def __init__(self, vector_size: int, cond_dim: int, hp):
        super().__init__()
        self.kind, self.sampler, self.sample_steps = hp.generator, hp.sample_scheduler, hp.sample_steps
        self.vector_size, self.cond_dim = vector_size, cond_dim
        self.seed = hp.seed
        self.schedule = noise_schedule(hp)
        self.timestep_sampling, self.logit_mean, self.logit_std = (hp.gen_timestep_sampling, hp.gen_logit_mean,
                                                                   hp.gen_logit_std)
        with torch.random.fork_rng(devices=[]):  # deterministic initialisation without touching the global RNG
            torch.manual_seed(hp.seed)
            if self.kind == "dit":
                self.net = DiT(vector_size, cond_dim, hp.dit_patch_size, hp.gen_hidden, hp.gen_depth, hp.dit_heads,
                               hp.dit_mlp_ratio, hp.gen_cond_dropout, hp.dit_token_conditioning)
            else:
                self.net = MLPGenerator(cond_dim, vector_size, hp.gen_hidden, hp.gen_depth)
        self.net.eval()
        # weights = target_mean + target_unit * (model-space vector); set by train_on
        self.register_buffer("target_mean", torch.zeros(vector_size))
        self.register_buffer("target_unit", torch.ones(vector_size))
        # every query starts denoising from this one vector, so its weights depend on the query alone
        self.register_buffer("start_noise", torch.randn(vector_size, generator=torch.Generator().manual_seed(hp.seed)))

    def train_on(self, conds: torch.Tensor, edit_index: torch.Tensor, targets: torch.Tensor, hp,
                 progress: bool = True, checkpoint=None,
                 held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Train so that ``conds[m]`` (M, c) generates ``targets[edit_index[m]]`` (E, P).

        ``checkpoint`` (a ``megedit.checkpoint.RunCheckpoint``): the training state (network, optimiser, LR schedule,
        RNG) is saved every ``hp.checkpoint_gen_epochs`` epochs and at the end, and training resumes from it.
        Data-parallel: every rank passes the same arguments; each computes the loss on its slice of every batch
        (``megedit.training.backward_on_shard``).
        ``held_out`` (conds (H, c), edit_index (H,) into ``targets``): queries it never trains on, e.g. unseen views
        of some edits. Every ``hp.checkpoint_gen_epochs`` epochs and at the end, the relative L2 error of the weights
        sampled for them (1: no better than the mean target) is recorded in "curve" (training is unchanged); with
        ``hp.gen_stop_patience`` > 0, training stops once that many records in a row fail to improve on the best by
        ``hp.gen_stop_min_delta``.
        With ``hp.gen_diverge_ratio`` > 0, training raises once its loss rises that many times above its best
        (``loss_rose``; a resumed run checks from its resumed epoch on), before the state is saved.
        ``hp.gen_epoch_unit``: "views" (an epoch is one pass over every row of ``conds``) or "edits" (one row per
        edit, drawn at random among its rows, so every edit is seen once an epoch whatever its number of views).
        Returns {"loss": final epoch's mean loss, "seconds", "steps": optimiser steps, "epochs", "curve"}.
        """
        conds, edit_index, normalised = self._normalise_targets(conds, edit_index, targets, hp)
        device = self.target_mean.device
        g = torch.Generator(device).manual_seed(hp.seed)  # batches, noise, timesteps and condition dropout
        scheduler = DDPMScheduler(**self.schedule)
        opt = torch.optim.AdamW(self.net.parameters(), lr=hp.gen_lr, weight_decay=hp.gen_weight_decay)
        M = len(conds)
        if hp.gen_epoch_unit == "edits":
            by_edit = torch.argsort(edit_index, stable=True)  # rows grouped by edit
            counts = torch.bincount(edit_index, minlength=len(normalised))  # (E,)
            first = torch.cumsum(counts, 0) - counts  # each edit's first position in by_edit
            trained_edits = (counts > 0).nonzero().squeeze(1)
            per_epoch = len(trained_edits)
        else:
            per_epoch = M
        batches = math.ceil(per_epoch / hp.gen_batch_size)
        # a small edit set gives few batches per epoch: run enough epochs to reach gen_min_steps optimiser steps
        epochs = max(hp.gen_epochs, math.ceil(hp.gen_min_steps / batches))
        total_steps = epochs * batches
        # memorising E targets: a short warm-up, then a cosine decay that lets the last epochs settle precisely
        lr_schedule = get_cosine_schedule_with_warmup(opt, max(1, total_steps // 20), total_steps)
        state = TrainingState(checkpoint, "generator.pt", net=self.net, optimizer=opt, lr_schedule=lr_schedule,
                              rng=g)
        saved = state.resume()
        start = time.perf_counter()
        first_epoch, steps, epoch_loss = saved.get("epoch", 0), saved.get("steps", 0), saved.get("loss", math.nan)
        curve, epoch = list(saved.get("curve", [])), first_epoch - 1
        losses, window = [], math.ceil(DIVERGENCE_ROWS / per_epoch)
        start_in_sync(self.net)
        self.net.train()
        bar = tqdm(range(first_epoch, epochs), initial=first_epoch, total=epochs, desc="stage 4: train generator",
                   disable=not progress)
        for epoch in bar:
            total = torch.zeros((), device=device)
            if hp.gen_epoch_unit == "edits":  # one random row of each edit, in random order
                pick = first[trained_edits] + (torch.rand(per_epoch, generator=g, device=device)
                                               * counts[trained_edits]).long().clamp_max(counts[trained_edits] - 1)
                rows = by_edit[pick][torch.randperm(per_epoch, generator=g, device=device)]
            else:
                rows = torch.randperm(M, generator=g, device=device)
            for idx in rows.split(hp.gen_batch_size):
                x0, cond = normalised[edit_index[idx]], conds[idx]
                loss_of = lambda rows: self._loss(x0, cond, scheduler, g, hp.gen_cond_dropout, rows=rows)  # noqa: E731
                summed = backward_on_shard(loss_of, len(idx), opt, self.net.parameters())
                if summed is not None:
                    total += summed
                opt.step()
                lr_schedule.step()
                steps += 1
            epoch_loss = (distributed.all_reduce_sum(total) / per_epoch).item()
            if not math.isfinite(epoch_loss):  # checked before any checkpoint: a diverged state is never saved
                raise RuntimeError(f"generator training diverged: loss {epoch_loss} in epoch "
                                   f"{epoch + 1}/{epochs} (lr {hp.gen_lr}); lower gen_lr or gen_target_scale")
            losses.append(epoch_loss)
            if loss_rose(losses, window, hp.gen_diverge_ratio):  # also before any checkpoint
                raise RuntimeError(
                    f"generator training diverged: its loss rose to {epoch_loss:.4f} in epoch {epoch + 1}/{epochs}, "
                    f"over {hp.gen_diverge_ratio}x its best ({min(losses):.4f}), at gen_lr {hp.gen_lr} with "
                    f"{per_epoch} rows an epoch. Lower gen_lr and run again: the stages before the generator are "
                    f"read back from checkpoint_dir. (gen_diverge_ratio: 0 turns this check off.)")
            stop = False
            if (epoch + 1) % hp.checkpoint_gen_epochs == 0 or epoch + 1 == epochs:
                point = {"epoch": epoch + 1, "steps": steps, "loss": epoch_loss}
                if held_out is not None and len(held_out[0]):
                    point["held_out_error"] = self._held_out_error(*held_out, normalised)
                curve.append(point)
                stop = self._no_progress(curve, hp)
                state.save(epoch=epoch + 1, steps=steps, loss=epoch_loss, curve=curve)
            bar.set_postfix(loss=f"{epoch_loss:.4f}")
            if stop:
                break
        self.net.eval()
        return {"loss": epoch_loss, "seconds": time.perf_counter() - start, "steps": steps,
                "epochs": curve[-1]["epoch"] if curve else epoch + 1, "curve": curve}

    @staticmethod
    def _no_progress(curve: list[dict], hp) -> bool:
        """Whether the last ``gen_stop_patience`` records of the held-out error all missed the best before them by
        ``gen_stop_min_delta`` (never with patience 0, or without a held-out error)."""
        errors = [p["held_out_error"] for p in curve if "held_out_error" in p]
        k = hp.gen_stop_patience
        if k <= 0 or len(errors) <= k:
            return False
        return min(errors[-k:]) > min(errors[:-k]) - hp.gen_stop_min_delta

    @torch.no_grad()
    def _held_out_error(self, conds: torch.Tensor, rows: torch.Tensor, normalised: torch.Tensor) -> float:
        """Mean relative L2 error of the weights sampled for ``conds`` against ``normalised[rows]``, in normalised
        space (the mean target is 0 there, so predicting it scores 1). Draws nothing from any RNG."""
        self.net.eval()
        try:
            conds = conds.to(normalised)
            y = self.net(conds) if self.kind == "mlp" else self._denoise(conds, self.sample_steps)  # (H, P)
        finally:
            self.net.train()
        x0 = normalised[rows.to(normalised.device)]  # (H, P)
        return float(((y.float() - x0).norm(dim=1) / x0.norm(dim=1).clamp_min(1e-8)).mean())

    def _normalise_targets(self, conds: torch.Tensor, edit_index: torch.Tensor, targets: torch.Tensor, hp):
        """Check the training data, set the per-coordinate normalisation from ``targets`` and return
        (conds, edit_index, normalised targets) on the generator's device and dtype."""
        if noise_schedule(hp) != self.schedule:
            raise ValueError("hp's noise schedule (gen_train_timesteps, gen_beta_schedule, gen_prediction_type) "
                             "differs from the one this generator was built with; build a new NeuronGenerator")
        if conds.ndim != 2 or edit_index.shape != (len(conds),) or len(conds) == 0:
            raise ValueError(f"need conds (M, c) and edit_index (M,) with M > 0, got {tuple(conds.shape)} and "
                             f"{tuple(edit_index.shape)}")
        if not torch.isfinite(targets).all():
            raise ValueError("targets contain NaN/inf; leave those edits out of generator training")
        device, dtype = self.target_mean.device, self.target_mean.dtype
        conds, edit_index, targets = conds.to(device, dtype), edit_index.to(device), targets.to(device, dtype)
        # per-coordinate normalisation; a coordinate that never varies keeps unit 1e-8 and normalises to 0
        self.target_mean.copy_(targets.mean(0))
        self.target_unit.copy_(targets.std(0, correction=0).clamp_min(1e-8) / hp.gen_target_scale)
        return conds, edit_index, (targets - self.target_mean) / self.target_unit  # (E, P)

    def _loss(self, x0: torch.Tensor, cond: torch.Tensor, scheduler: DDPMScheduler, g: torch.Generator,
              cond_dropout: float, rows: slice | None = None) -> torch.Tensor | None:
        """The batch's mean loss; with ``rows`` (data-parallel), the mean over those rows alone, None if there are none.

        The noise, timesteps and dropout are drawn for the whole batch either way, so that a row gets the same draw on
        whichever rank it lands, and every rank's generator ``g`` stays in step.
        """
        if self.kind == "mlp":
            if rows is not None:
                x0, cond = x0[rows], cond[rows]
            return F.mse_loss(self.net(cond), x0) if len(x0) else None
        N, device = len(x0), x0.device
        noise = torch.randn(x0.shape, generator=g, device=device)  # (N, P)
        # Few-step sampling only visits the noisiest timesteps; SD3's logit-normal density can put training there.
        u = compute_density_for_timestep_sampling(self.timestep_sampling, N, self.logit_mean, self.logit_std,
                                                  device=device, generator=g)
        T = scheduler.config.num_train_timesteps
        t = (u * T).long().clamp_(0, T - 1)  # (N,)
        drop = torch.rand(N, generator=g, device=device) < cond_dropout  # (N,)
        if rows is not None:
            x0, cond, noise, t, drop = x0[rows], cond[rows], noise[rows], t[rows], drop[rows]
            if not len(x0):
                return None
        prediction = self.net(scheduler.add_noise(x0, noise, t), t, cond, force_drop=drop)  # (N, P)
        kind = scheduler.config.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else scheduler.get_velocity(x0, noise, t)
        return F.mse_loss(prediction, target)

    @torch.no_grad()
    def sample(self, conds: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Neuron weights (N, P) for query embeddings ``conds`` (N, c); ``steps`` defaults to hp.sample_steps."""
        conds = conds.to(self.target_mean)
        if self.kind == "mlp":
            y = self.net(conds)  # (N, P)
        else:
            y = self._denoise(conds, self.sample_steps if steps is None else steps)  # (N, P)
        return self.target_mean + self.target_unit * y

    def _denoise(self, conds: torch.Tensor, steps: int) -> torch.Tensor:
        N, device = len(conds), conds.device
        scheduler = (DDIMScheduler if self.sampler == "ddim" else DDPMScheduler)(**self.schedule)  # fresh: stateful
        scheduler.set_timesteps(steps, device=device)
        keep_cond = torch.zeros(N, dtype=torch.bool, device=device)  # never drop the condition, whatever the mode
        x = self.start_noise.expand(N, -1)  # (N, P); both schedulers have init_noise_sigma = 1
        for i, t in enumerate(scheduler.timesteps):
            prediction = self.net(x, t, conds, force_drop=keep_cond)  # (N, P)
            if self.sampler == "ddim":
                out = scheduler.step(prediction, t, x, eta=0.0)
            else:  # ancestral: one identically seeded generator per row, so every query gets the same noise
                step_seed = self.seed + 1 + i  # + 1: not the stream start_noise came from
                out = scheduler.step(prediction, t, x, generator=[torch.Generator(device).manual_seed(step_seed)
                                                                  for _ in range(N)])
            x = out.prev_sample
        # The last step's x0 prediction: DDIM's last prev_timestep is only -1 (alpha = 1) when steps divides
        # num_train_timesteps; otherwise prev_sample would keep a little predicted noise.
        return out.pred_original_sample
