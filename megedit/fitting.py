"""Stage 3: fit one neuron per edit so the frozen LLM answers ``target_new``.

Many edits are optimised at once: each sequence of the batch gets its own edit's neuron, the loss is a sum of
independent per-edit terms (so an edit's fit does not depend on what it is batched with), and only the layers at and
above the edited one run (``megedit.tail_replay.TailStack``). Each edit is fitted on several views of its prompt (paraphrases and context
prefixes from ``augment``) so that the neuron still answers when the question is worded differently.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .arch import arch_of, hidden_size, mlp_of, neuron_parts, neuron_size
from .neuron import NeuronBatch, active_neurons, inject_neuron, neuron_activation
from .precision import attention_kernels
from .tail_replay import TailStack, split_tail
from .text import tokenize_answered


@dataclass
class FitResult:
    weights: torch.Tensor  # (E, P) canonical neuron weights
    ok: torch.Tensor  # (E,) bool: the prompt's answer tokens are all the argmax with the neuron (teacher forced)
    view_acc: torch.Tensor  # (E,) mean teacher-forced token accuracy over the edit's views
    loss: torch.Tensor  # (E,) final mean cross-entropy over the views
    steps: torch.Tensor  # (E,) Adam steps taken


def initial_neuron(model, scale: float, seed: int) -> torch.Tensor:
    """The shared starting point of every fit (paper: one random init for all edits)."""
    g = torch.Generator().manual_seed(seed)
    d = hidden_size(model)
    w = torch.randn(neuron_size(model), generator=g) * scale / d**0.5
    _, bias, _ = neuron_parts(w[None], arch_of(model).form, d)
    if bias is not None:
        bias.zero_()  # a view: w's bias
    return w


def canonicalise(weights: torch.Tensor, pre_sign: torch.Tensor, form: str, d: int) -> torch.Tensor:
    """One representative per equivalent neuron, so the generator learns one target per edit.

    The gated neuron adds (x·w_in)·w_out: (c·w_in, w_out/c) is the same neuron for any c ≠ 0. We fix |w_in| = |w_out|
    and the sign that makes the neuron's pre-activation on the edit's own answer positions positive (``pre_sign``).
    The dense form has no such symmetry (its activation is not odd or homogeneous) and is returned unchanged.
    """
    if form != "gated":
        return weights
    w_in, _, w_out = neuron_parts(weights, form, d)
    scale = (w_out.norm(dim=1, keepdim=True) / w_in.norm(dim=1, keepdim=True).clamp_min(1e-12)).sqrt()
    sign = torch.where(pre_sign < 0, -1.0, 1.0).unsqueeze(1)
    return torch.cat([w_in * scale * sign, w_out / scale * sign], dim=1)


def _group_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    total = values.new_zeros(n).index_add(0, index, values)
    count = values.new_zeros(n).index_add(0, index, torch.ones_like(values))
    return total / count.clamp_min(1)


# norms tried for each half (w_in, w_out) of a gradient-initialised neuron, as multiples of the norm s0 at which the
# first-order loss reaches zero; on SmolLM2 (32 CounterFact edits) the chosen norm was 1.7-4.7 s0, mostly 2-3 s0
GRADIENT_INIT_NORMS = (1.5, 2.0, 2.5, 3.0, 4.0, 6.0)


def _answer_loss(stack, seq_edit, tok_seq, tok_pos, tok_ids, E, W=None, seqs=None):
    """Each edit's mean answer cross-entropy over its views (E,), with neurons ``W`` (E, P) active (None: none).

    ``seqs``: replay only these sequences (an edit with none of its views among them gets 0); None: all.
    """
    if seqs is None:
        seqs, rows = torch.arange(len(seq_edit), device=seq_edit.device), None
    else:
        rows = seqs
    local = torch.full((len(seq_edit),), -1, dtype=torch.long, device=seq_edit.device)
    local[seqs] = torch.arange(len(seqs), device=seq_edit.device)
    keep = local[tok_seq] >= 0
    batch = None if W is None else NeuronBatch(torch.arange(len(seqs), device=W.device), W[seq_edit[seqs]], len(seqs))
    with active_neurons(batch):
        hidden = stack.forward_hidden(stack.hidden if rows is None else stack.hidden[rows], rows=rows)
    logits = stack.logits(hidden, local[tok_seq[keep]], tok_pos[keep])
    ce = F.cross_entropy(logits.float(), tok_ids[keep], reduction="none")
    return _group_mean(_group_mean(ce, local[tok_seq[keep]], len(seqs)), seq_edit[seqs], E)


def gradient_init(stack, mlp, seq_edit, tok_seq, tok_pos, tok_ids, E, d, stop_loss):
    """A starting neuron per edit, and its loss, from one backward pass of the unedited model (gated form: adds
    (x·w_in)·w_out).

    To first order the answer loss changes by Σ_t (x_t·w_in)(g_t·w_out), x_t the MLP input and g_t the loss gradient at
    the MLP output of tail position t; the steepest rank-one descent is the top singular pair (u, v) of Σ_t x_t g_tᵀ,
    w_in = s·u, w_out = -s·v, with the norm s chosen per edit among GRADIENT_INIT_NORMS. One backward and a few
    forward passes of the tail replay: on SmolLM2 the Adam steps after it fell from 11.4 to 0.5 per edit.
    """
    grads = []

    def add_probe(module, args, out):  # a zero added to the MLP output, to read the loss gradient there
        probe = torch.zeros_like(out, requires_grad=True)
        grads.append(probe)
        return out + probe

    handle = mlp.register_forward_hook(add_probe)
    try:
        with torch.enable_grad():
            base_loss = _answer_loss(stack, seq_edit, tok_seq, tok_pos, tok_ids, E)
            base_loss.sum().backward()
    finally:
        handle.remove()
    base_loss = base_loss.detach()  # the probe adds zeros: this is the unedited model's loss
    g = grads[0].grad.float() * stack.tail_mask.float()[..., None]  # (S, T, d); padding carries no gradient anyway
    x = stack.tail_mlp_in.float()
    row_edit = seq_edit.repeat_interleave(x.shape[1])
    x, g = x.reshape(-1, d), g.reshape(-1, d)
    normalize = F.normalize

    # per edit Σ_t a_t (b_t·w_e); with M = Σ_t x_t g_tᵀ: M w = times(x, g, w) and Mᵀ w = times(g, x, w)
    def times(a, b, w):
        return a.new_zeros(E, d).index_add_(0, row_edit, a * (b * w[row_edit]).sum(1, keepdim=True))

    # top singular pair of M by power iteration, in factored form (never a d×d matrix; draws no random numbers)
    v = normalize(g.new_zeros(E, d).index_add_(0, row_edit, g), dim=1)  # start: the summed gradient
    for _ in range(30):
        v = normalize(times(g, x, times(x, g, v)), dim=1)
    u = normalize(times(x, g, v), dim=1)
    sigma = (times(x, g, v) * u).sum(1)  # uᵀ M v: the loss falls by ≈ s²σ at norm s
    s0 = (base_loss / sigma.clamp_min(1e-12)).sqrt()  # (E,)
    direction = torch.cat([u, -v], dim=1)  # (E, 2d): each half of unit norm
    # the smallest norm whose loss meets the stopping rule (a stronger neuron than needed disturbs more when
    # misrouted); the lowest loss where none does. Each norm replays only the views of edits still unmet.
    chosen = s0 * GRADIENT_INIT_NORMS[-1]
    best_loss = torch.full((E,), float("inf"), device=x.device)
    met = torch.zeros(E, dtype=torch.bool, device=x.device)
    for m in GRADIENT_INIT_NORMS:
        seqs = torch.nonzero(~met[seq_edit]).squeeze(1)
        if not len(seqs):
            break
        with torch.no_grad():
            loss = _answer_loss(stack, seq_edit, tok_seq, tok_pos, tok_ids, E, direction * (m * s0[:, None]), seqs)
        take = ~met & ((loss < stop_loss) | (loss < best_loss))
        chosen[take], best_loss[take] = m * s0[take], loss[take]
        met |= take & (loss < stop_loss)
    return direction * chosen[:, None], best_loss


def _fit_chunk(model, tok, neuron, mlp, layer, views, targets, init, hp):
    """Fit the edits of one chunk; returns a FitResult (weights not yet canonical) and each edit's pre-activation sign."""
    E = len(views)
    device = next(mlp.parameters()).device  # where the neuron acts (with a device_map, maybe not the embeddings')
    seq_edit = torch.tensor([e for e, vs in enumerate(views) for _ in vs], device=device)
    prompts = [v for vs in views for v in vs]
    full, plen = tokenize_answered(tok, prompts, [targets[e] for e in seq_edit.tolist()])
    batch = split_tail(full, plen, tok.pad_token_id if tok.pad_token_id is not None else 0)
    stack = TailStack(model, layer, batch)
    labels = batch.labels.to(device)
    tok_seq, tok_pos = torch.nonzero(labels != -100, as_tuple=True)  # every answer token: its sequence and position
    tok_ids = labels[tok_seq, tok_pos]
    d = stack.hidden.shape[-1]
    act = getattr(mlp, neuron.act_name) if neuron.form == "dense" else None
    pmask, tmask = stack.prefix_mask.float(), stack.tail_mask.float()

    def silence(w, seqs):
        """Neuron energy on the prompt body relative to the answer positions (scale-free); 0 for single-token prompts."""
        a_pre = neuron_activation(stack.prefix_mlp_in[seqs], w, neuron.form, act, d).pow(2)
        a_tail = neuron_activation(stack.tail_mlp_in[seqs], w, neuron.form, act, d).pow(2)
        pre = (a_pre * pmask[seqs]).sum(1) / pmask[seqs].sum(1).clamp_min(1)
        tail = (a_tail * tmask[seqs]).sum(1) / tmask[seqs].sum(1).clamp_min(1)
        return pre / (tail + 1e-6)

    loss_now = torch.full((E,), float("inf"), device=device)
    if hp.fit_init == "gradient" and neuron.form == "gated":
        start, loss_now = gradient_init(stack, mlp, seq_edit, tok_seq, tok_pos, tok_ids, E, d, hp.fit_stop_loss)
    else:
        start = init.to(device).repeat(E, 1)
    W = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=hp.fit_lr)
    active = ~(loss_now < hp.fit_stop_loss)  # a start that already meets the stopping rule is kept as it is
    taken = torch.zeros(E, dtype=torch.long, device=device)
    for _ in range(hp.fit_steps):
        if not active.any():
            break
        seqs = torch.nonzero(active[seq_edit]).squeeze(1)  # sequences of edits still being fitted
        w_seq = W[seq_edit[seqs]]
        per_edit = _answer_loss(stack, seq_edit, tok_seq, tok_pos, tok_ids, E, W, seqs)
        fitted = torch.unique(seq_edit[seqs])
        loss_now[fitted] = per_edit[fitted].detach()
        active &= ~(loss_now < hp.fit_stop_loss)  # met the stopping rule with the current weights: keep them
        if not active.any():
            break
        objective = per_edit[active].sum()
        if hp.fit_silence_weight > 0:
            objective = objective + hp.fit_silence_weight * _group_mean(silence(w_seq, seqs), seq_edit[seqs], E)[active].sum()
        opt.zero_grad(set_to_none=False)
        objective.backward()
        frozen = W.detach()[~active].clone()
        opt.step()
        with torch.no_grad():
            W[~active] = frozen
        taken[active] += 1

    W = W.detach()
    all_seqs = torch.arange(len(seq_edit), device=device)
    with torch.no_grad(), active_neurons(NeuronBatch(all_seqs, W[seq_edit], len(seq_edit))):
        logits = stack.logits(stack.forward_hidden(stack.hidden), tok_seq, tok_pos)
    correct = (logits.argmax(-1) == tok_ids).float()
    seq_acc = _group_mean(correct, tok_seq, len(seq_edit))
    first_seq = torch.searchsorted(seq_edit, torch.arange(E, device=device))  # each edit's first view = its prompt
    w_in = neuron_parts(W, neuron.form, d)[0]
    pre = (stack.tail_mlp_in[tok_seq, tok_pos] * w_in[seq_edit[tok_seq]]).sum(-1)  # pre-activation at answer positions
    finite = torch.isfinite(W).all(dim=1) & torch.isfinite(loss_now)  # a NaN/inf fit is never "ok"
    result = FitResult(weights=W.cpu(), ok=((seq_acc[first_seq] == 1) & finite).cpu(),
                       view_acc=_group_mean(seq_acc, seq_edit, E).cpu(), loss=loss_now.cpu(), steps=taken.cpu())
    return result, _group_mean(pre, seq_edit[tok_seq], E).cpu()


def fit_neurons(model, tok, views: list[list[str]], targets: list[str], hp, progress: bool = True,
                checkpoint=None) -> FitResult:
    """Fit one neuron per edit at layer ``hp.layer``. ``views[e][0]`` is edit e's prompt, the rest its training views.

    ``checkpoint`` (a ``megedit.checkpoint.RunCheckpoint``): each chunk of ``hp.fit_batch_edits`` edits is saved once
    fitted, and a chunk found there is loaded instead of fitted again.

    Data-parallel (``megedit.distributed``): the chunks still to fit are dealt out one per rank per round; after each
    round every rank receives the round's fits (so rank 0 can checkpoint them), and all ranks return every edit's fit.
    A chunk's fit does not depend on which rank makes it, so the result is the single-process one.
    """
    if len(views) != len(targets):
        raise ValueError(f"views has {len(views)} edits but targets has {len(targets)}: give one target per edit")
    neuron = inject_neuron(model, hp.layer)
    mlp = mlp_of(model, hp.layer)
    spec, d = arch_of(model), hidden_size(model)
    init = initial_neuron(model, hp.fit_init_scale, hp.seed)
    chunk_edits = hp.fit_batch_edits
    starts = list(range(0, len(views), chunk_edits))
    name = "neurons/from_{:06d}.safetensors".format
    parts = {s: FitResult(**checkpoint.load_tensors(name(s))) for s in starts
             if checkpoint is not None and checkpoint.has(name(s))}
    todo = [s for s in starts if s not in parts]
    ranks, rank = distributed.world_size(), distributed.rank()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)  # the LLM is frozen: no weight gradients, only the neuron's
    # initial=: a resumed run's checkpointed edits count toward the position, not toward the rate (or the ETA)
    bar = tqdm(total=len(views), initial=sum(len(p.ok) for p in parts.values()), desc="stage 3: fit neurons",
               unit="edit", disable=not progress)
    try:
        for first in range(0, len(todo), ranks):
            round_starts, part = todo[first:first + ranks], None  # one chunk per rank (the last round: maybe fewer)
            if rank < len(round_starts):
                start = round_starts[rank]
                with attention_kernels(next(mlp.parameters())):
                    part, signs = _fit_chunk(model, tok, neuron, mlp, hp.layer, views[start:start + chunk_edits],
                                             targets[start:start + chunk_edits], init, hp)
                part.weights = canonicalise(part.weights, signs, spec.form, d)
            for start, fitted in zip(round_starts, distributed.all_gather_objects(part)):
                parts[start] = fitted
                if checkpoint is not None:
                    checkpoint.save_tensors(name(start), vars(fitted))
                bar.update(len(fitted.ok))
            bar.set_postfix(ok=f"{float(torch.cat([r.ok for r in parts.values()]).float().mean()):.3f}")
    finally:
        bar.close()
        for p in trainable:
            p.requires_grad_(True)
    # a NaN/inf fit has ok False; train_meg reports it by case_id and leaves it out of generator training
    results = [parts[s] for s in starts]  # edit order
    return FitResult(*(torch.cat([getattr(r, f) for r in results]) for f in FitResult.__dataclass_fields__))
