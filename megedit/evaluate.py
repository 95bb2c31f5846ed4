"""Reliability, Generality and Locality, teacher-forced (TF) and by greedy generation (AG), and the harmonic Score.

- TF is EasyEdit's definition: feed ``prompt + " " + answer`` in one pass; the share of answer tokens that are the argmax
  at the position before them. Locality TF compares the edited model's argmax tokens at the locality answer's positions
  with the unedited model's. A model that routes each query (MeG) decides on the prompt alone, as ``generate`` does,
  and is teacher-forced under that decision: the answer being scored never sways the gate. (EasyEdit's own
  ``compute_edit_quality`` feeds prompt + answer to the model, so MeG routes there on both; ``megedit run`` reports
  those numbers beside these as EasyEdit's own.)
- AG: greedy generation of as many tokens as the answer has; 1 if they are exactly the answer's tokens. Locality AG: 1
  if the edited model generates exactly what the unedited model generated.
- Score: harmonic mean of the six numbers (the MeG paper's).
"""
from __future__ import annotations

import contextlib
import math
from statistics import mean

import torch
from tqdm.auto import tqdm

from .neuron import active_neurons
from .text import encode_answered

METRICS = ("rel_tf", "rel_ag", "gen_tf", "gen_ag", "loc_tf", "loc_ag")


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def teacher_forced(model, tok, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[tuple[list[int], list[int]]]:
    """For each pair: (argmax tokens at the answer positions, the answer's tokens)."""
    out = []
    device = next(model.parameters()).device
    for sl in _batches(len(prompts), batch_size):
        b = encode_answered(tok, prompts[sl], answers[sl])
        with routed_on_prompts(model, tok, prompts[sl]):
            logits = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).logits
        pred = logits[b.answer_seq, b.answer_pos].argmax(-1).cpu()
        for i in range(len(b.prompt_lengths)):
            sel = b.answer_seq == i
            out.append((pred[sel].tolist(), b.answer_ids[sel].tolist()))
    return out


def routed_on_prompts(model, tok, prompts: list[str]):
    """For a model that routes each query (``MeGModel``): its decision for each prompt alone, exactly as ``generate``
    takes it, held for a forward pass over the same rows with their answers appended. Other models: nothing to hold."""
    if not hasattr(model, "route") or not hasattr(model, "edit"):
        return contextlib.nullcontext()
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    return active_neurons(model.route(enc["input_ids"], enc["attention_mask"]))


@torch.no_grad()
def greedy(model, tok, prompts: list[str], n_tokens: list[int], batch_size: int = 32) -> list[list[int]]:
    """Greedy continuation of each prompt, ``n_tokens[i]`` tokens long (batched with left padding).

    A batch generates as many tokens as its longest answer needs: prompts are batched in order of answer length, so one
    long answer (zsRE's locality answers reach 126 tokens) does not make 31 short ones generate that long.
    """
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (n_tokens[i], len(prompts[i])))
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for sl in _batches(len(order), batch_size):
            rows = order[sl]
            enc = tok([prompts[i] for i in rows], return_tensors="pt", padding=True).to(device)
            n = max(n_tokens[i] for i in rows)
            gen = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                 pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:].cpu()
            for j, i in enumerate(rows):
                out[i] = new[j, :n_tokens[i]].tolist()
    finally:
        tok.padding_side = side
    return out


def answer_length(tok, prompt: str, answer: str) -> int:
    return len(tok(prompt + " " + answer)["input_ids"]) - len(tok(prompt)["input_ids"])


def _locality_items(requests):
    items = []
    for i, r in enumerate(requests):
        for name, loc in (r.get("locality") or {}).items():
            prompts = loc["prompt"] if isinstance(loc["prompt"], list) else [loc["prompt"]]
            answers = loc["ground_truth"] if isinstance(loc["ground_truth"], list) else [loc["ground_truth"]]
            items += [(i, p, str(a[0] if isinstance(a, list) else a)) for p, a in zip(prompts, answers) if p]
    return items


@torch.no_grad()
def locality_reference(model, tok, requests, batch_size: int = 32) -> dict:
    """What the unedited model predicts on each locality prompt (TF argmax tokens and greedy tokens)."""
    items = _locality_items(requests)
    prompts, answers = [p for _, p, _ in items], [a for _, _, a in items]
    tf = teacher_forced(model, tok, prompts, answers, batch_size)
    ag = greedy(model, tok, prompts, [answer_length(tok, p, a) for p, a in zip(prompts, answers)], batch_size)
    return {"tf": [p for p, _ in tf], "ag": ag}


@torch.no_grad()
def evaluate_requests(model, tok, requests, reference: dict | None = None, batch_size: int = 32, progress: bool = True) -> dict:
    """Per-request metrics and their means (in %) for ``model`` on ``requests``.

    ``reference`` is ``locality_reference`` of the unedited model; without it locality is not measured.
    """
    per = [dict() for _ in requests]
    parts = [("rel", [r["prompt"] for r in requests], list(range(len(requests))))]
    gen_idx = [i for i, r in enumerate(requests) if r.get("rephrase_prompt")]
    parts.append(("gen", [requests[i]["rephrase_prompt"] for i in gen_idx], gen_idx))
    bar = tqdm(total=4 if reference is None else 6, desc="evaluate", disable=not progress)
    for name, prompts, idx in parts:
        targets = [requests[i]["target_new"] for i in idx]
        for i, (pred, gold) in zip(idx, teacher_forced(model, tok, prompts, targets, batch_size)):
            per[i][f"{name}_tf"] = mean(float(a == b) for a, b in zip(pred, gold))
        bar.update()
        lengths = [answer_length(tok, p, t) for p, t in zip(prompts, targets)]
        gold = [g for _, g in teacher_forced_tokens(tok, prompts, targets)]
        for i, out, g in zip(idx, greedy(model, tok, prompts, lengths, batch_size), gold):
            per[i][f"{name}_ag"] = float(out == g)
        bar.update()
    if reference is not None:
        items = _locality_items(requests)
        prompts, answers = [p for _, p, _ in items], [a for _, _, a in items]
        tf = teacher_forced(model, tok, prompts, answers, batch_size)
        bar.update()
        ag = greedy(model, tok, prompts, [answer_length(tok, p, a) for p, a in zip(prompts, answers)], batch_size)
        bar.update()
        scores: dict[int, list] = {}
        for (i, _, _), (pred, _), ref_tf, out, ref_ag in zip(items, tf, reference["tf"], ag, reference["ag"]):
            s = scores.setdefault(i, [[], []])
            s[0].append(mean(float(a == b) for a, b in zip(pred, ref_tf)))
            s[1].append(float(out == ref_ag))
        for i, (t, a) in scores.items():
            per[i]["loc_tf"], per[i]["loc_ag"] = mean(t), mean(a)
    bar.close()
    return {"per_request": per, "summary": summarise(per)}


def teacher_forced_tokens(tok, prompts, answers):
    b = encode_answered(tok, prompts, answers)
    return [(None, b.answer_ids[b.answer_seq == i].tolist()) for i in range(len(prompts))]


def summarise(per_request: list[dict]) -> dict:
    summary = {}
    for m in METRICS:
        values = [p[m] for p in per_request if m in p]
        if values:
            summary[m] = 100.0 * mean(values)
    summary["score"] = score(summary)
    return summary


def score(summary: dict) -> float:
    """Harmonic mean of the six metrics (in %); 0 if any is 0, NaN if one is missing."""
    values = [summary.get(m) for m in METRICS]
    if any(v is None for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
