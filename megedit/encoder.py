"""Stage 1: tune the text encoder so that a paraphrase lands next to its fact and a near miss does not.

InfoNCE via sentence-transformers' ``MultipleNegativesRankingLoss``: anchor = a pseudo-edit's prompt, positive = its
paraphrase, negatives = the rest of the batch plus, per example, two hard negatives built from the pool (same
relation/other subject and same subject/other relation). Paraphrase-only tuning teaches "same subject ⇒ same fact",
which makes the gate accept other questions about an edited subject; the hard negatives are what prevents that.
Trained only on the pseudo-edit pool, never on the edits' evaluation prompts.
"""
from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import PseudoEditPool
from .leakage import HeldOutTexts

try:  # sentence-transformers >= 5.x moved the losses
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
except ImportError:  # pragma: no cover - older releases
    from sentence_transformers.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import batch_to_device


def _with_answer(text: str, answer: str | None, rng: random.Random) -> str:
    # routing also sees "prompt + answer" (teacher-forced evaluation), so half the texts carry one
    return f"{text} {answer}" if answer and rng.random() < 0.5 else text


def training_columns(pool: PseudoEditPool, n_pairs: int, hard_negatives: bool, seed: int,
                     held_out: HeldOutTexts | None = None) -> list[list[str]]:
    """Columns [anchors, positives, (same-relation negatives, same-subject negatives)] from the pool.

    A row with any text that leaks an evaluation text of ``held_out`` is left out (and counted there)."""
    rng = random.Random(seed)
    items = [it for it in pool.items if it.rephrase]
    rng.shuffle(items)
    rows = []
    for it in items[:n_pairs]:
        row = [_with_answer(it.prompt, it.answer, rng), _with_answer(it.rephrase, it.answer, rng)]
        if hard_negatives:
            near = pool.near_misses({"prompt": it.prompt, "subject": it.subject}, 1)
            if not near["same_relation"] or not near["same_subject"]:
                continue
            row += [_with_answer(*near["same_relation"][0], rng), _with_answer(*near["same_subject"][0], rng)]
        if held_out is not None and any(held_out.leaks(t) for t in row):
            held_out.left_out["encoder_pairs"] += 1
            continue
        rows.append(row)
    return [list(col) for col in zip(*rows)]


def trainable_parameters(encoder, last_layers: int) -> list[torch.nn.Parameter]:
    """The parameters of the encoder's last ``last_layers`` transformer layers (all parameters if 0).

    The paper tunes only BERT's last layer: cheaper (no gradients below) and it keeps the pretrained features.
    """
    if last_layers <= 0:
        return [p for p in encoder.parameters()]
    blocks = [m for m in encoder.modules() if isinstance(m, torch.nn.ModuleList)]
    if not blocks:
        raise ValueError("cannot find the encoder's transformer layers; set encoder_trainable_layers: 0 to tune all")
    layers = max(blocks, key=len)  # the stack of transformer layers
    return [p for layer in list(layers)[-last_layers:] for p in layer.parameters()]


def tune_encoder(encoder, pool: PseudoEditPool, hp, progress: bool = True, held_out: HeldOutTexts | None = None) -> dict:
    """Tune ``encoder`` (a SentenceTransformer) in place; returns {"loss": [...], "seconds": s, "examples": n}.

    ``held_out``: the edit set's evaluation texts, kept out of the pairs."""
    columns = training_columns(pool, hp.encoder_pairs, hp.encoder_hard_negatives, hp.seed, held_out)
    n = len(columns[0]) if columns else 0
    if n < 2:
        raise ValueError("the pseudo-edit pool gives fewer than 2 (prompt, paraphrase) pairs: cannot tune the encoder")
    loss_fn = MultipleNegativesRankingLoss(encoder, scale=hp.encoder_scale)
    params = trainable_parameters(encoder, hp.encoder_trainable_layers)
    encoder.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=hp.encoder_lr)
    g = torch.Generator().manual_seed(hp.seed)
    losses, start = [], time.time()
    encoder.train()
    steps = hp.encoder_epochs * ((n + hp.encoder_batch_size - 1) // hp.encoder_batch_size)
    bar = tqdm(total=steps, desc="stage 1: tune encoder", disable=not progress)
    try:
        for _ in range(hp.encoder_epochs):
            order = torch.randperm(n, generator=g).tolist()
            for s in range(0, n, hp.encoder_batch_size):
                idx = order[s: s + hp.encoder_batch_size]
                if len(idx) < 2:
                    continue
                features = [batch_to_device(encoder.tokenize([col[i] for i in idx]), encoder.device) for col in columns]
                loss = loss_fn(features, None)
                opt.zero_grad()  # (the official MeG code forgets this and accumulates gradients)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        encoder.eval()
        bar.close()
    return {"loss": losses, "seconds": time.time() - start, "examples": n}


@torch.no_grad()
def _embedding_dim(encoder) -> int:
    # sentence-transformers renamed the getter in 5.x; keep both so older installs work
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return getter()


def embed(encoder, texts: list[str], batch_size: int = 128, progress: bool = False) -> torch.Tensor:
    """L2-normalised sentence embeddings (N, dim) on the CPU, in input order."""
    if not texts:
        return torch.zeros(0, _embedding_dim(encoder))
    emb = encoder.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress)
    return F.normalize(emb.float(), dim=-1).cpu()
