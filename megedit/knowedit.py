"""KnowEdit records (EasyEdit's benchmark format) as EasyEdit request dicts, and the fixed validation/reported split.

A KnowEdit record holds ``prompt``, ``subject``, ``target_new``, ``ground_truth`` (a string or a list of aliases) and
``locality`` / ``portability`` mappings from a kind (``Relation_Specificity``, ``Forgetfulness``; ``Subject_Aliasing``,
``Reasoning``, ``Logical_Generalization``) to a list of ``{prompt, ground_truth}`` items. It has no rephrase prompt.
Each kind is kept under its own name as ``{"prompt": [...], "ground_truth": [[aliases], ...]}``: one entry per item, every
answer as its list of aliases (first = the one EasyEdit scores), so that each kind can be evaluated on its own.
"""
from __future__ import annotations

import hashlib

LOCALITY_KINDS = ("Relation_Specificity", "Forgetfulness")
PORTABILITY_KINDS = ("Subject_Aliasing", "Reasoning", "Logical_Generalization")

# The split: a record belongs to the validation part when the first byte of sha256("megedit-knowedit-split:<index>")
# (index = its position in the file, 0-based) is below 77, i.e. ~30% of records (wiki_counterfact_train_cf.json:
# 432 validation, 995 reported). It depends only on the position, so it is the same for every method, seed and size.
# Every setting is chosen on the validation part; the reported part is for figures only.
SPLITS = ("validation", "reported")
VALIDATION_BYTES = 77  # of 256


def aliases(answer) -> list[str]:
    """An answer as a flat list of non-empty alias strings (KnowEdit nests alias lists; a plain string is one alias)."""
    if isinstance(answer, (list, tuple)):
        return [a for item in answer for a in aliases(item)]
    if answer is None:
        return []
    text = str(answer).strip()
    return [text] if text else []


def _kinds(groups: dict | None, where: str) -> dict:
    """``{kind: {"prompt": [...], "ground_truth": [[aliases], ...]}}``, items without a prompt or answer left out."""
    if groups is None:
        return {}
    if not isinstance(groups, dict):
        raise ValueError(f"{where} must map each kind to a list of {{prompt, ground_truth}}, got {type(groups).__name__}")
    out = {}
    for kind, items in groups.items():
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise ValueError(f"{where}.{kind} must be a list of {{prompt, ground_truth}}, got {type(items).__name__}")
        prompts, answers = [], []
        for item in items:
            if not isinstance(item, dict) or "prompt" not in item:
                raise ValueError(f"{where}.{kind}: each item needs 'prompt' and 'ground_truth', got {item!r}")
            # a prompt given as a list (some KnowEdit files): its first entry, as EasyEdit reads it
            prompt = item["prompt"][0] if isinstance(item["prompt"], list) and item["prompt"] else item["prompt"]
            answer = aliases(item.get("ground_truth"))
            if isinstance(prompt, str) and prompt.strip() and answer:
                prompts.append(prompt)
                answers.append(answer)
        if prompts:
            out[kind] = {"prompt": prompts, "ground_truth": answers}
    return out


def from_knowedit(r: dict, i: int) -> dict:
    """One KnowEdit record (position ``i`` in its file) as an EasyEdit request dict."""
    truth = aliases(r.get("ground_truth"))
    return {
        "case_id": r.get("case_id", i),
        "prompt": r["prompt"],
        "subject": r.get("subject"),
        "target_new": aliases(r["target_new"])[0] if isinstance(r["target_new"], list) else r["target_new"],
        "ground_truth": truth[0] if truth else None,
        "ground_truth_aliases": truth,
        "rephrase_prompt": r.get("rephrase_prompt"),  # KnowEdit has none; kept if a file adds one
        "locality": _kinds(r.get("locality"), f"record {i}: locality"),
        "portability": _kinds(r.get("portability"), f"record {i}: portability"),
    }


def first_item(entry: dict) -> dict:
    """``{"prompt", "ground_truth"}`` of an entry's first item as plain strings (a KnowEdit kind holds lists of items
    and alias lists; a CounterFact entry is already plain)."""
    prompt, answer = entry.get("prompt"), entry.get("ground_truth")
    if not isinstance(prompt, list):
        return entry
    answer = aliases(answer[0]) if prompt else []
    return {"prompt": prompt[0] if prompt else None, "ground_truth": answer[0] if answer else None}


def is_knowedit(record: dict) -> bool:
    """KnowEdit keeps locality/portability as mappings of kinds (CounterFact has flat locality_prompt fields)."""
    return "prompt" in record and "target_new" in record and (
        isinstance(record.get("locality"), dict) or isinstance(record.get("portability"), dict))


def split_of(index: int) -> str:
    """The part ("validation" or "reported") of the record at position ``index`` of its file."""
    byte = hashlib.sha256(f"megedit-knowedit-split:{index}".encode()).digest()[0]
    return "validation" if byte < VALIDATION_BYTES else "reported"


def split_positions(n_records: int, part: str) -> list[int]:
    """The positions, in file order, of the records of ``part`` among ``n_records``."""
    if part not in SPLITS:
        raise ValueError(f"unknown split {part!r}; choose one of {SPLITS}")
    return [i for i in range(n_records) if split_of(i) == part]
