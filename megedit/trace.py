"""Why an edited model answered one query as it did: the gate's numbers against its thresholds, the edits the query
resembles, and the answer with and without the edit (``megedit ask``). Locality failures are explained one query at a
time: a same-subject question that passes the gate shows which edit it was mistaken for, and by how much.
"""
from __future__ import annotations

import torch

from .encoder import embed
from .model import MeGModel


@torch.no_grad()
def nearest_edits(edit, emb: torch.Tensor, k: int) -> list[dict]:
    """The ``k`` edits with a view most similar to the (one) query embedding ``emb`` (1, dim), best first; [] when the
    edit does not know what it edited (saved before megedit kept it)."""
    keys = edit.familiarity.keys
    if not edit.edits or edit.key_edit is None or len(keys) != len(edit.key_edit) or k <= 0:
        return []
    sims = (emb.to(keys.device).float() @ keys.float().T)[0].cpu()  # (n_keys,)
    owner = torch.tensor(edit.key_edit)
    best = torch.full((len(edit.edits),), -2.0).scatter_reduce(0, owner, sims, reduce="amax")  # per edit: best view
    top = torch.topk(best, min(k, len(best)))
    return [{"edit": int(i), **edit.edits[int(i)], "similarity": float(s)} for s, i in zip(top.values, top.indices)]


def _greedy_text(model, tok, question: str, max_new_tokens: int) -> str:
    enc = tok(question, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def trace_query(edited: MeGModel, question: str, k: int = 3, max_new_tokens: int = 10) -> dict:
    """For one query: the gate's entropy and nearest-key similarity against ε and τ, its decision, the ``k`` nearest
    edits, and the greedy answer of the unedited and of the edited model.

    The gate sees what ``edited`` routes on: the question's tokens decoded back to text."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"the question must be a non-empty string, got {question!r}")
    tok, gate = edited.tokenizer, edited.edit.familiarity
    ids = tok(question, return_tensors="pt")
    routed = edited.texts(ids["input_ids"], ids["attention_mask"])[0]
    emb = embed(edited.edit.encoder, [routed])
    entropy, similarity = float(gate.entropy(emb)[0]), float(gate.nearest_similarity(emb)[0])
    epsilon, tau = float(gate.epsilon), float(gate.tau)
    familiar = entropy < epsilon and similarity >= tau  # FamiliarityNet.familiar's rule
    relation = None
    if familiar and edited.edit.relation is not None and edited.edit.key_edit is not None:
        from .relation import explain_for_trace

        relation = explain_for_trace(edited.edit, routed, emb)
    applied = familiar and (relation is None or relation["allowed"])
    if applied != bool(edited.edit.route([routed]).rows.numel()):  # the trace must explain the real decision
        raise RuntimeError("the trace's decision differs from the runtime routing's")
    # the wrapped model alone runs without the neuron: that is the unedited answer
    return {"question": question, "routed_text": routed,
            "entropy": entropy, "epsilon": epsilon, "entropy_below_epsilon": entropy < epsilon,
            "similarity": similarity, "tau": tau, "similarity_reaches_tau": similarity >= tau,
            "familiar": familiar, "relation_check": relation, "edit_applied": applied,
            "nearest_edits": nearest_edits(edited.edit, emb, k),
            "answer_unedited": _greedy_text(edited.model, tok, question, max_new_tokens),
            "answer_edited": _greedy_text(edited, tok, question, max_new_tokens)}


def _decision(t: dict) -> str:
    if not t["familiar"]:
        return "not familiar: the unedited model answers"
    rel = t.get("relation_check")
    if rel is None:
        return "familiar: the generated neuron is applied"
    if rel["similarity"] is None:
        return ("familiar; relation check: no nearest edit's subject is named in the query, so the gate's decision "
                "stands: the generated neuron is applied")
    above = rel["similarity"] >= rel["threshold"]
    verdict = (f"{rel['similarity']:.4f} {'>=' if above else '<'} threshold {rel['threshold']:.4f}")
    if above and rel.get("prompt_similarity") is not None:
        nearer = not rel["allowed"]  # only the margin rule can refuse a query above the threshold
        verdict += (f"; another edit's prompt is {'nearer' if nearer else 'not nearer'} at "
                    f"{rel['prompt_similarity']:.4f} (margin {rel['margin']:.2f})")
    verdict += (": the generated neuron is applied" if rel["allowed"] else
                ": refused (same subject, another relation), the unedited model answers")
    named = ", ".join(f"case {e['case_id']} ({e['subject']!r})" for e in rel["subject_edits"])
    return (f"familiar; relation check: the query names the subject of {named}; subject masked, "
            f"{rel['relation_text']!r} is closest to that edit's views at {verdict}")


def format_trace(t: dict) -> str:
    """The trace as a few lines of text."""
    yes = {True: "yes", False: "no"}
    lines = [f"query: {t['question']!r}",
             f"gate: entropy {t['entropy']:.4f} < epsilon {t['epsilon']:.4f}? {yes[t['entropy_below_epsilon']]}; "
             f"nearest-view similarity {t['similarity']:.4f} >= tau {t['tau']:.4f}? "
             f"{yes[t['similarity_reaches_tau']]}",
             "decision: " + _decision(t)]
    if t["nearest_edits"]:
        lines.append("nearest edits (cosine similarity of the query to the edit's closest training view):")
        lines += [f"  {e['similarity']:.4f}  case {e['case_id']}: {e['prompt']!r} -> {e['target_new']!r}"
                  for e in t["nearest_edits"]]
    else:
        lines.append("nearest edits: unknown (this edit was saved without its edits' texts)")
    lines += [f"answer without the edit: {t['answer_unedited']!r}", f"answer with the edit:    {t['answer_edited']!r}"]
    return "\n".join(lines)
