"""Knowledge-editing datasets read from a path into EasyEdit request dicts.

A request is ``{"case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
"locality": {"neighborhood": {"prompt", "ground_truth"}}, "portability": {}}`` — what EasyEdit's
``BaseEditor._prepare_requests`` builds (KnowEdit: one locality/portability entry per kind, ``megedit.knowedit``).
Files are read where they lie (``$MEGEDIT_DATA`` resolves relative paths); nothing is copied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .knowedit import from_knowedit, is_knowedit, split_positions

FORMATS = ("counterfact", "counterfact-rome", "zsre", "knowedit")


def resolve_data_path(path: str | os.PathLike) -> Path:
    """``path`` as given if it exists, else relative to ``$MEGEDIT_DATA``."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists() and not p.is_absolute() and os.environ.get("MEGEDIT_DATA"):
        alt = Path(os.environ["MEGEDIT_DATA"]) / p
        if alt.exists():
            return alt
    if not p.exists():
        hint = "" if os.environ.get("MEGEDIT_DATA") else " (relative paths are also looked up under $MEGEDIT_DATA, which is unset)"
        raise FileNotFoundError(f"data file {str(path)!r} does not exist{hint}")
    if p.is_dir():
        raise ValueError(f"data path {str(path)!r} is a folder ({p}); give the JSON file inside it")
    return p


def detect_format(record: dict) -> str:
    if isinstance(record.get("requested_rewrite"), dict):
        return "counterfact-rome"
    if "src" in record and "alt" in record:
        return "zsre"
    if is_knowedit(record):
        return "knowedit"
    if "prompt" in record and "target_new" in record:
        return "counterfact"
    raise ValueError(
        f"unknown data format (record keys {sorted(record)}); expected one of {FORMATS}: EasyEdit CounterFact "
        "(prompt, target_new, ...), ROME CounterFact (requested_rewrite, ...), MEND zsRE (src, alt, ...) or KnowEdit "
        "(prompt, target_new, locality/portability kinds)"
    )


def _locality(prompt: str | None, answer: str | None) -> dict:
    return {"neighborhood": {"prompt": prompt, "ground_truth": answer}} if prompt else {}


def _from_counterfact(r: dict, i: int) -> dict:
    return {
        "case_id": r.get("case_id", i),
        "prompt": r["prompt"],
        "subject": r.get("subject"),
        "target_new": r["target_new"],
        "ground_truth": r.get("ground_truth"),
        "rephrase_prompt": r.get("rephrase_prompt"),
        "locality": _locality(r.get("locality_prompt"), r.get("locality_ground_truth")),
        "portability": {},
    }


def _from_counterfact_rome(r: dict, i: int) -> dict:
    rw = r["requested_rewrite"]
    neighbours = r.get("neighborhood_prompts") or [None]
    paraphrases = r.get("paraphrase_prompts") or [None]
    return {
        "case_id": r.get("case_id", i),
        "prompt": rw["prompt"].format(rw["subject"]),
        "subject": rw["subject"],
        "target_new": rw["target_new"]["str"],
        "ground_truth": rw["target_true"]["str"],
        "rephrase_prompt": paraphrases[0],
        "locality": _locality(neighbours[0], rw["target_true"]["str"]),
        "portability": {},
    }


def _from_zsre(r: dict, i: int) -> dict:
    answers = r.get("answers") or [None]
    portability = {}
    if isinstance(r.get("portability"), dict) and r["portability"].get("New Question"):
        portability = {"one_hop": {"prompt": r["portability"]["New Question"],
                                   "ground_truth": r["portability"]["New Answer"]}}
    return {
        "case_id": r.get("case_id", i),
        "prompt": r["src"],
        "subject": r.get("subject"),
        "target_new": r["alt"],
        "ground_truth": answers[0],
        "rephrase_prompt": r.get("rephrase"),
        "locality": _locality(r.get("loc"), r.get("loc_ans")),
        "portability": portability,
    }


_CONVERTERS = {"counterfact": _from_counterfact, "counterfact-rome": _from_counterfact_rome, "zsre": _from_zsre,
               "knowedit": from_knowedit}


def load_requests(fmt: str, path: str | os.PathLike, n: int | None = None, offset: int = 0,
                  split: str | None = None) -> list[dict]:
    """Read ``path`` (format ``fmt`` or "auto") and return requests ``offset .. offset+n``.

    ``split`` ("validation" or "reported", see ``megedit.knowedit.split_of``): only the records of that part of the
    file, in file order; ``offset`` and ``n`` then count within the part, and case ids stay file positions."""
    if fmt not in FORMATS + ("auto",):
        raise ValueError(f"unknown data format {fmt!r}; choose one of {FORMATS + ('auto',)}")
    if n is not None and n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0 (the first record to edit), got {offset}")
    p = resolve_data_path(path)
    try:
        records = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{p} must hold a non-empty JSON list of records")
    if fmt == "auto":
        fmt = detect_format(records[0])
    elif detect_format(records[0]) != fmt:
        raise ValueError(f"{p} looks like {detect_format(records[0])!r} data, not {fmt!r}")
    positions = list(range(len(records))) if split is None else split_positions(len(records), split)
    chosen = positions[offset: None if n is None else offset + n]
    if n is not None and len(chosen) < n:
        part = "" if split is None else f" ({len(positions)} in its {split} part)"
        raise ValueError(f"{p} has {len(records)} records{part}; asked for {n} from offset {offset}")
    return [_convert_record(_CONVERTERS[fmt], fmt, records[i], i, p) for i in chosen]


def _convert_record(convert, fmt: str, record, i: int, path: Path) -> dict:
    """One record as a request; a record unlike the first (the format is told from that one) is named, not a crash."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record {i} is a JSON {type(record).__name__}, not an object like the first record")
    try:
        return convert(record, i)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        what = f"has no {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
        raise ValueError(f"{path}: record {i} {what}; every record must be a {fmt} record like the first") from None


def validate_requests(requests, need_subject: bool | str = False) -> list[dict]:
    """Check requests before any expensive work; return them as a list. Raises ValueError naming the case and field.

    ``need_subject``: every request must have a subject; a string says why (it ends the message).
    """
    if isinstance(requests, dict):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise ValueError("no requests to edit: the request list is empty")
    for i, r in enumerate(requests):
        where = f"request {i} (case_id {r.get('case_id', i)!r})" if isinstance(r, dict) else f"request {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where} is a {type(r).__name__}, expected a dict with 'prompt' and 'target_new'")
        for key in ("prompt", "target_new"):
            if key not in r:
                raise ValueError(f"{where} has no {key!r}: every request needs 'prompt' and 'target_new'")
            if not isinstance(r[key], str) or not r[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {r[key]!r}")
        subject = r.get("subject")
        if need_subject and not subject:
            why = need_subject if isinstance(need_subject, str) else "this method needs the subject of each edit"
            raise ValueError(f"{where} has no 'subject': {why}")
        if subject and subject not in r["prompt"]:
            raise ValueError(f"{where}: subject {subject!r} is not a substring of prompt {r['prompt']!r}")
    # the same prompt with two answers cannot both hold: reject rather than silently keep one (drop_conflicts says
    # what a conflict is)
    _, dropped = drop_conflicts(requests)
    if dropped:
        i = dropped[0]
        r = requests[i]
        j, first = next((j, f) for j, f in enumerate(requests) if f["prompt"] == r["prompt"])
        raise ValueError(
            f"request {i} (case_id {r.get('case_id', i)!r}): prompt {r['prompt']!r} is edited twice with conflicting "
            f"targets {first['target_new']!r} (case_id {first.get('case_id', j)!r}) and {r['target_new']!r} "
            f"(case_id {r.get('case_id', i)!r}); drop one of them (megedit.data.drop_conflicts, `megedit edit "
            "--drop-conflicts` or a run config's data.drop_conflicts keep the first)"
        )
    return requests


def drop_conflicts(requests: list[dict]) -> tuple[list[dict], list[int]]:
    """The requests without each one whose prompt an earlier request already edits to another target, and the
    positions of those left out. Large CounterFact slices hold such pairs (79 in the edit split's first 10,000): the
    first edit of a prompt is kept, so the choice is the same for every method and every prefix of the file."""
    first: dict[str, str] = {}
    kept, dropped = [], []
    for i, r in enumerate(requests):
        if first.setdefault(r["prompt"], r["target_new"]) == r["target_new"]:
            kept.append(r)
        else:
            dropped.append(i)
    return kept, dropped


def make_requests(prompts: list[str], target_new: list[str], subject: list[str] | None = None,
                  ground_truth: list[str] | None = None, rephrase_prompts: list[str] | None = None) -> list[dict]:
    """Request dicts from parallel lists (EasyEdit's ``editor.edit(prompts=..., target_new=...)`` shape), validated."""
    if isinstance(prompts, str):
        prompts = [prompts]
    columns = {"target_new": target_new, "subject": subject, "ground_truth": ground_truth,
               "rephrase_prompts": rephrase_prompts}
    columns = {k: [v] if isinstance(v, str) else v for k, v in columns.items() if v is not None}
    for name, values in columns.items():
        if len(values) != len(prompts):
            raise ValueError(f"prompts has {len(prompts)} items but {name} has {len(values)}: give one {name} "
                             "per prompt (the lists are read in parallel)")
    rows = [{"case_id": i, "prompt": p, "target_new": None, "subject": None, "ground_truth": None, "rephrase_prompt": None,
             "locality": {}, "portability": {}} for i, p in enumerate(prompts)]
    for name, values in columns.items():
        key = "rephrase_prompt" if name == "rephrase_prompts" else name
        for row, value in zip(rows, values):
            row[key] = value
    return validate_requests(rows)
