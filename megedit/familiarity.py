"""Stage 2: the familiarity network — does this query touch an edited fact?

A K-way classifier over the (frozen, tuned) query embedding, trained to put every view of an edit into that edit's
random class (paper: K = 10). A query it has learned gives a confident, low-entropy prediction; the gate opens when the
entropy is below ε. We add outlier exposure: near misses (same relation/other subject, same subject/other relation,
unrelated) are trained towards the uniform prediction, so "close but different" queries get high entropy instead of
whatever the net happens to say. A classifier's entropy is arbitrary far from everything it was trained on (an
unrelated question is neither an edit view nor a near miss), so the gate also asks that the query lie within cosine
similarity τ of some edit view it was trained on. ε and τ are chosen together on held-out calibration queries, never on
evaluation data.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .training import TrainingState, backward_on_shard, start_in_sync


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.ff(self.norm(x))


class FamiliarityNet(nn.Module):
    """Embedding (N, dim) -> K logits. Buffers: ``epsilon`` (entropy threshold), ``keys`` (embeddings of the edits'
    views, fp16) and ``tau`` (the similarity a familiar query must reach to its nearest key)."""

    def __init__(self, dim: int, hidden: int, blocks: int, classes: int, n_keys: int = 0):
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualBlock(dim, hidden) for _ in range(blocks)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))
        self.register_buffer("epsilon", torch.tensor(float("nan")))
        self.register_buffer("tau", torch.tensor(-1.0))
        self.register_buffer("keys", torch.zeros(n_keys, dim, dtype=torch.float16))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(emb))

    @torch.no_grad()
    def entropy(self, emb: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(self(emb.to(self.epsilon.device)).float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    @torch.no_grad()
    def nearest_similarity(self, emb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Cosine similarity of each (normalised) embedding to its nearest key; 1 when there are no keys."""
        emb = emb.to(self.keys.device).float()
        if len(self.keys) == 0:
            return emb.new_ones(len(emb))
        best = emb.new_full((len(emb),), -1.0)
        for start in range(0, len(self.keys), chunk):  # bounded memory however many edits
            best = torch.maximum(best, (emb @ self.keys[start:start + chunk].float().T).max(dim=1).values)
        return best

    @torch.no_grad()
    def familiar(self, emb: torch.Tensor, epsilon: float | None = None, tau: float | None = None) -> torch.Tensor:
        """Whether the gate opens for each embedding; ``epsilon``/``tau`` replace the calibrated thresholds."""
        if epsilon is None and torch.isnan(self.epsilon):
            raise RuntimeError("the familiarity gate has no epsilon yet: call choose_thresholds or set it")
        epsilon = self.epsilon if epsilon is None else epsilon
        tau = self.tau if tau is None else tau
        return (self.entropy(emb) < epsilon) & (self.nearest_similarity(emb) >= tau)


def train_familiarity(net: FamiliarityNet, pos: torch.Tensor, labels: torch.Tensor, neg: torch.Tensor, hp,
                      progress: bool = True, checkpoint=None,
                      calibration: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None) -> dict:
    """Cross-entropy to each positive's class + ``familiarity_outlier_weight`` × cross-entropy of negatives to uniform.

    ``checkpoint`` (a ``megedit.checkpoint.RunCheckpoint``): the training state is saved after every epoch (at 10,000
    edits one takes minutes on a CPU) and training resumes from it.
    ``calibration`` (familiar embeddings, {near-miss kind: embeddings}), held out: after every epoch the thresholds are
    chosen on them (``choose_thresholds``; the caller chooses the final ones) and the result recorded in "curve"; with
    ``hp.familiarity_patience`` > 0, training stops once that many epochs in a row fail to raise the best balanced
    accuracy by ``hp.familiarity_min_delta`` (the LR schedule is still planned over ``familiarity_epochs``).
    """
    g = torch.Generator().manual_seed(hp.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=hp.familiarity_lr)
    steps_per_epoch = max(1, math.ceil(len(pos) / hp.familiarity_batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, hp.familiarity_lr, total_steps=hp.familiarity_epochs * steps_per_epoch)
    device = net.epsilon.device
    state = TrainingState(checkpoint, "familiarity.pt", net=net, optimizer=opt, lr_schedule=sched, rng=g)
    saved = state.resume()
    first_epoch, loss_value, start = saved.get("epoch", 0), saved.get("loss", math.nan), time.time()
    curve, epochs_run = list(saved.get("curve", [])), first_epoch
    outliers = len(neg) > 0 and hp.familiarity_outlier_weight > 0
    start_in_sync(net)
    net.train()
    bar = tqdm(range(first_epoch, hp.familiarity_epochs), initial=first_epoch, total=hp.familiarity_epochs,
               desc="stage 2: familiarity", disable=not progress)
    try:
        for epoch in bar:
            order = torch.randperm(len(pos), generator=g)
            total = torch.zeros(())
            for s in range(0, len(pos), hp.familiarity_batch_size):
                idx = order[s: s + hp.familiarity_batch_size]
                # drawn for the whole batch on every rank, so that every rank's generator g stays in step
                nidx = torch.randint(len(neg), (len(idx),), generator=g) if outliers else None
                summed = backward_on_shard(lambda rows: _batch_loss(net, pos, labels, neg, idx, nidx, rows, hp, device),
                                           len(idx), opt, net.parameters())
                if summed is not None:
                    total += summed.float().cpu()
                opt.step()
                sched.step()
            loss_value = (distributed.all_reduce_sum(total) / len(pos)).item()  # the epoch's mean loss
            if not math.isfinite(loss_value):  # checked before the checkpoint: a diverged state is never saved
                raise RuntimeError(f"familiarity training diverged (loss {loss_value})")
            epochs_run = epoch + 1
            if calibration is not None:
                chosen = choose_thresholds(net, *calibration, hp.familiarity_epsilon)
                curve.append({"epoch": epoch + 1, "loss": loss_value,
                              **{k: chosen[k] for k in ("balanced_accuracy", "familiar_pass", "near_miss_blocked")}})
            state.save(epoch=epoch + 1, loss=loss_value, curve=curve)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if _no_progress([c["balanced_accuracy"] for c in curve], hp.familiarity_patience,
                            hp.familiarity_min_delta):
                break
    finally:
        net.eval()
    report = {"loss": loss_value, "seconds": time.time() - start, "positives": len(pos), "negatives": len(neg),
              "epochs": epochs_run}
    if curve:
        report["curve"] = curve
    return report


def _batch_loss(net, pos, labels, neg, idx, nidx, rows, hp, device):
    """Mean loss over ``rows`` of the batch (None: all; data-parallel: this rank's slice): cross-entropy of each
    positive to its class, plus ``familiarity_outlier_weight`` × cross-entropy of a drawn negative to uniform."""
    if rows is not None:
        idx, nidx = idx[rows], (nidx[rows] if nidx is not None else None)
        if not len(idx):
            return None
    loss = F.cross_entropy(net(pos[idx].to(device)), labels[idx].to(device))
    if nidx is not None:
        logp = F.log_softmax(net(neg[nidx].to(device)).float(), dim=-1)  # float: autocast keeps it bf16
        loss = loss + hp.familiarity_outlier_weight * (-logp.mean(-1)).mean()
    return loss


def _no_progress(scores: list[float], patience: int, min_delta: float) -> bool:
    """Whether the last ``patience`` scores all failed to beat the best before them by ``min_delta`` (never with
    patience 0)."""
    if patience <= 0 or len(scores) <= patience:
        return False
    return max(scores[-patience:]) < max(scores[:-patience]) + min_delta


def _midpoints(values: torch.Tensor) -> torch.Tensor:
    """Thresholds between consecutive distinct values, plus one below and one above all of them."""
    v = values.unique()
    inner = (v[1:] + v[:-1]) / 2
    return torch.cat([v[:1] - 1e-6, inner, v[-1:] + 1e-6])


def choose_thresholds(net: FamiliarityNet, familiar: torch.Tensor, unfamiliar: dict[str, torch.Tensor],
                      fixed_epsilon: float | None = None, tau_grid_size: int = 41) -> dict:
    """Set ``net.epsilon`` and ``net.tau`` to the pair with the best balanced accuracy on calibration queries.

    Balanced accuracy = (rate of familiar queries let through + mean over near-miss kinds of the rate kept out) / 2, so
    each near-miss kind counts as much as the others however many there are. Both thresholds are taken in the middle of
    the range of equally good values (ε among midpoints of observed entropies, τ on an even grid of similarities), so
    queries a little beyond the calibration set keep a margin on both sides.
    """
    h_fam, s_fam = net.entropy(familiar).cpu(), net.nearest_similarity(familiar).cpu()
    unf = {k: (net.entropy(v).cpu(), net.nearest_similarity(v).cpu()) for k, v in unfamiliar.items() if len(v)}
    if fixed_epsilon is not None:
        eps_grid = torch.tensor([fixed_epsilon])
    else:
        eps_grid = _midpoints(torch.cat([h_fam, *(h for h, _ in unf.values())]))
    sims = torch.cat([s_fam, *(s for _, s in unf.values())])
    tau_grid = torch.cat([torch.tensor([-1.0]), torch.linspace(float(sims.min()), float(s_fam.min()), tau_grid_size)])
    per_tau = []
    for tau in tau_grid.tolist():
        tpr = ((h_fam[None, :] < eps_grid[:, None]) & (s_fam >= tau)).float().mean(1)  # (G,)
        tnr = {k: ((h[None, :] >= eps_grid[:, None]) | (s < tau)).float().mean(1) for k, (h, s) in unf.items()}
        bal = (tpr + torch.stack(list(tnr.values())).mean(0)) / 2 if tnr else tpr / 2  # (G,)
        top = torch.nonzero(bal >= bal.max() - 1e-9).squeeze(1)
        i = int(top[len(top) // 2])  # the middle of the best range of epsilon
        per_tau.append({"epsilon": float(eps_grid[i]), "tau": tau, "balanced_accuracy": float(bal[i]),
                        "familiar_pass": float(tpr[i]), "near_miss_blocked": {k: float(v[i]) for k, v in tnr.items()}})
    top_bal = max(c["balanced_accuracy"] for c in per_tau)
    ties = [c for c in per_tau if c["balanced_accuracy"] >= top_bal - 1e-9]
    best = ties[len(ties) // 2]  # the middle of the best range of tau
    net.epsilon.fill_(best["epsilon"])
    net.tau.fill_(best["tau"])
    return best


def gate_rates(net: FamiliarityNet, familiar: torch.Tensor, unfamiliar: dict[str, torch.Tensor]) -> dict:
    """Pass rate on familiar queries and block rate per near-miss kind at the current epsilon."""
    out = {"familiar_pass": float(net.familiar(familiar).float().mean()) if len(familiar) else math.nan}
    for k, v in unfamiliar.items():
        if len(v):
            out[f"{k}_blocked"] = float((~net.familiar(v)).float().mean())
    return out
