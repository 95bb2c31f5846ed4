"""Reliability, Generality and Locality, teacher-forced (TF) and by greedy generation (AG), and the harmonic Score.

- TF is EasyEdit's definition: feed ``prompt + " " + answer`` in one pass; the share of answer tokens that are the argmax
  at the position before them. Locality TF compares the edited model's argmax tokens at the locality answer's positions
  with the unedited model's. A model that routes each query (MeG) decides on the prompt alone, as ``generate`` does,
  and is teacher-forced under that decision: the answer being scored never sways the gate. (EasyEdit's own
  ``compute_edit_quality`` feeds prompt + answer to the model, so MeG routes there on both; ``megedit run`` reports
  those numbers beside these as EasyEdit's own.)
- AG: greedy generation of as many tokens as the answer has; 1 if they are exactly the answer's tokens. Locality AG: 1
  if the edited model generates exactly what the unedited model generated.
- Per kind (``loc_tf.<kind>``, ``loc_ag.<kind>``): locality of each kind of locality prompt on its own (CounterFact's
  ``neighborhood``; KnowEdit's ``Relation_Specificity``, ``Forgetfulness``). ``loc_tf``/``loc_ag`` pool every kind of a
  request (for CounterFact: its one neighbourhood prompt, as before).
- Portability per kind (``port_tf.<kind>``, ``port_ag.<kind>``; KnowEdit's ``Subject_Aliasing``, ``Reasoning``,
  ``Logical_Generalization``): TF on the answer's first alias (EasyEdit's); AG is 1 if greedy generation gives exactly
  the tokens of any alias.
- Score: harmonic mean of the six numbers (the MeG paper's); for data without rephrase prompts (KnowEdit) of the four
  Rel and Loc numbers. Per-kind and portability numbers never enter it.
"""
from __future__ import annotations

import contextlib
import math
from statistics import mean

import torch
from tqdm.auto import tqdm

from .neuron import active_neurons
from .records import METRICS
from .text import answered, encode_answered

KIND_PREFIXES = ("loc_tf", "loc_ag", "port_tf", "port_ag")  # per-kind metrics are named <prefix>.<kind>


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
    return len(tok(answered(prompt, answer))["input_ids"]) - len(tok(prompt)["input_ids"])


def _locality_entries(requests) -> list[tuple[int, str, str, str]]:
    """(request, kind, prompt, answer) for every locality prompt, in request order."""
    entries = []
    for i, r in enumerate(requests):
        for kind, loc in (r.get("locality") or {}).items():
            prompts = loc["prompt"] if isinstance(loc["prompt"], list) else [loc["prompt"]]
            answers = loc["ground_truth"] if isinstance(loc["ground_truth"], list) else [loc["ground_truth"]]
            entries += [(i, kind, p, str(a[0] if isinstance(a, list) else a)) for p, a in zip(prompts, answers) if p]
    return entries


def _locality_predictions(model, tok, entries, batch_size: int, bar=None) -> tuple[list, list]:
    """``model``'s teacher-forced predictions and greedy tokens on each locality entry (``_locality_entries``)."""
    prompts, answers = [p for _, _, p, _ in entries], [a for _, _, _, a in entries]
    tf = teacher_forced(model, tok, prompts, answers, batch_size)
    if bar is not None:
        bar.update()
    ag = greedy(model, tok, prompts, [answer_length(tok, p, a) for p, a in zip(prompts, answers)], batch_size)
    if bar is not None:
        bar.update()
    return tf, ag


def _portability_items(requests) -> list[tuple[int, str, str, list[str]]]:
    """(request, kind, prompt, aliases of the answer) for every portability prompt."""
    from .knowedit import aliases

    items = []
    for i, r in enumerate(requests):
        for kind, entry in (r.get("portability") or {}).items():
            if isinstance(entry["prompt"], list):  # one answer (or alias list) per prompt
                pairs = zip(entry["prompt"], entry["ground_truth"])
            else:  # one prompt: a list answer is its aliases
                pairs = [(entry["prompt"], entry["ground_truth"])]
            items += [(i, kind, p, aliases(a)) for p, a in pairs if p and aliases(a)]
    return items


@torch.no_grad()
def portability(model, tok, requests, per: list[dict], batch_size: int = 32) -> None:
    """Add ``port_tf.<kind>`` and ``port_ag.<kind>`` (means over the request's prompts of that kind) to ``per``."""
    items = _portability_items(requests)
    if not items:
        return
    prompts, first = [p for _, _, p, _ in items], [a[0] for _, _, _, a in items]
    tf = teacher_forced(model, tok, prompts, first, batch_size)
    golds = [[g for _, g in teacher_forced_tokens(tok, [p] * len(a), a)] for _, _, p, a in items]
    out = greedy(model, tok, prompts, [max(len(g) for g in gold) for gold in golds], batch_size)
    scores: dict[tuple[int, str], list] = {}
    for (i, kind, _, _), (pred, gold_first), tokens, gold in zip(items, tf, out, golds):
        s = scores.setdefault((i, kind), [[], []])
        s[0].append(mean(float(a == b) for a, b in zip(pred, gold_first)))
        s[1].append(float(any(tokens[:len(g)] == g for g in gold)))
    for (i, kind), (t, a) in scores.items():
        per[i][f"port_tf.{kind}"], per[i][f"port_ag.{kind}"] = mean(t), mean(a)


@torch.no_grad()
def locality_reference(model, tok, requests, batch_size: int = 32) -> dict:
    """What the unedited model predicts on each locality prompt (TF argmax tokens and greedy tokens)."""
    tf, ag = _locality_predictions(model, tok, _locality_entries(requests), batch_size)
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
        if not prompts:  # e.g. KnowEdit: no rephrase prompts, no Generality
            bar.update(2)
            continue
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
        entries = _locality_entries(requests)
        tf, ag = _locality_predictions(model, tok, entries, batch_size, bar)
        scores: dict[int, list] = {}
        by_kind: dict[tuple[int, str], list] = {}
        for (i, kind, _, _), (pred, _), ref_tf, out, ref_ag in zip(entries, tf, reference["tf"], ag, reference["ag"]):
            match = (mean(float(a == b) for a, b in zip(pred, ref_tf)), float(out == ref_ag))
            for s in (scores.setdefault(i, [[], []]), by_kind.setdefault((i, kind), [[], []])):
                s[0].append(match[0])
                s[1].append(match[1])
        for i, (t, a) in scores.items():
            per[i]["loc_tf"], per[i]["loc_ag"] = mean(t), mean(a)
        for (i, kind), (t, a) in by_kind.items():
            per[i][f"loc_tf.{kind}"], per[i][f"loc_ag.{kind}"] = mean(t), mean(a)
    portability(model, tok, requests, per, batch_size)
    bar.close()
    return {"per_request": per, "summary": summarise(per)}


def teacher_forced_tokens(tok, prompts, answers):
    b = encode_answered(tok, prompts, answers)
    return [(None, b.answer_ids[b.answer_seq == i].tolist()) for i in range(len(prompts))]


def kind_metrics(keys) -> list[str]:
    """The per-kind metric names among ``keys`` (``loc_tf.<kind>``, ``port_ag.<kind>``, ...): locality first, each
    kind's TF then AG."""
    found = {k for k in keys if "." in k and k.split(".", 1)[0] in KIND_PREFIXES}
    return sorted(found, key=lambda k: (k.startswith("port"), k.split(".", 1)[1], k.split(".", 1)[0].endswith("ag")))


def summarise(per_request: list[dict]) -> dict:
    summary = {}
    for m in (*METRICS, *kind_metrics({k for p in per_request for k in p})):
        values = [p[m] for p in per_request if m in p]
        if values:
            summary[m] = 100.0 * mean(values)
    summary["score"] = score(summary)
    return summary


def score(summary: dict) -> float:
    """Harmonic mean of the six metrics (in %); 0 if any is 0, NaN if one is missing. Data without rephrase prompts
    (no gen_tf and no gen_ag, e.g. KnowEdit): the harmonic mean of the four Rel and Loc numbers."""
    names = METRICS if "gen_tf" in summary or "gen_ag" in summary else [m for m in METRICS if not m.startswith("gen")]
    values = [summary.get(m) for m in names]
    if any(v is None for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
