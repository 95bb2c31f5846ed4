"""How the familiarity gate treats queries it never trained or calibrated on.

Locality rests on the gate alone, so its rates are reported per kind of query:
- should pass: the edit prompts and their dataset rephrasings (evaluation data; measured here, never trained on);
  (and, per kind, the dataset's portability prompts, ``portability.<kind>``: KnowEdit's Subject_Aliasing should pass);
- should be blocked: the dataset's locality prompts (all kinds, and ``locality.<kind>`` per kind where there are several,
  e.g. KnowEdit's same-subject Relation_Specificity), fresh near misses of each kind drawn from the pseudo-edit pool with
  a salt of their own (minus every text the gate trained or was calibrated on), and unrelated questions (e.g. the NQ
  questions of zsRE's locality set).
"""
from __future__ import annotations

import torch

from .augment import NEAR_MISS_KINDS, PseudoEditPool
from .model import MeGEdit


@torch.no_grad()
def familiar_rate(edit: MeGEdit, texts: list[str]) -> float | None:
    if not texts:
        return None
    return float(edit.applies(texts).float().mean())  # the gate's decision, and the relation check's where there is one


def _prompts(entry) -> list[str]:
    """The prompts of one locality/portability entry (a prompt, or a list of them as KnowEdit keeps them)."""
    if not isinstance(entry, dict):
        return []
    prompts = entry.get("prompt")
    return [p for p in (prompts if isinstance(prompts, list) else [prompts]) if isinstance(p, str) and p]


def locality_prompts(request: dict) -> list[str]:
    """Every locality prompt of a request, all kinds (KnowEdit keeps several per kind)."""
    return [p for entry in (request.get("locality") or {}).values() for p in _prompts(entry)]


def _by_kind(requests: list[dict], field: str) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for r in requests:
        for kind, entry in (r.get(field) or {}).items():
            kinds.setdefault(kind, []).extend(_prompts(entry))
    return kinds


def seen_by_training(pool: PseudoEditPool, requests: list[dict], hp) -> set[str]:
    """The near misses the gate learned from (salt "near") or was calibrated on (salt "calibration")."""
    seen = set()
    for r in requests:
        for salt, n in (("near", hp.n_near_misses), ("calibration", 1)):
            for pairs in pool.near_misses(r, n, salt=salt).values():
                seen.update(t for t, _ in pairs)
    return seen


def gate_probe(edit: MeGEdit, requests: list[dict], pool: PseudoEditPool | None, questions: list[str] = (),
               n_per_kind: int = 2, trained_on: list[dict] | None = None) -> dict:
    """Gate pass rates on fresh queries of each kind; ``rates[kind]`` is the fraction judged familiar.

    ``requests`` are the edits probed; ``trained_on`` (default: the same) are all the edits the gate learned, whose
    near misses are never counted as fresh."""
    groups: dict[str, list[str]] = {
        "edit_prompt": [r["prompt"] for r in requests],
        "rephrase": [r["rephrase_prompt"] for r in requests if r.get("rephrase_prompt")],
        "locality": [p for r in requests for p in locality_prompts(r)],
    }
    locality_kinds = _by_kind(requests, "locality")
    if len(locality_kinds) > 1:  # one kind alone would repeat "locality"
        groups.update({f"locality.{k}": v for k, v in locality_kinds.items()})
    groups.update({f"portability.{k}": v for k, v in _by_kind(requests, "portability").items()})
    if pool is not None:
        seen = seen_by_training(pool, requests if trained_on is None else trained_on, edit.hparams)
        fresh = {k: [] for k in NEAR_MISS_KINDS}
        for r in requests:
            for kind, pairs in pool.near_misses(r, n_per_kind, salt="probe").items():
                fresh[kind] += [t for t, _ in pairs if t not in seen]
        groups.update({f"near_{k}": v for k, v in fresh.items()})
    groups["questions"] = list(questions)
    rates = {k: familiar_rate(edit, v) for k, v in groups.items()}
    return {"familiar_rate": {k: v for k, v in rates.items() if v is not None},
            "n": {k: len(v) for k, v in groups.items() if v}}
