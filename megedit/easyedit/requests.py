"""EasyEdit's request arguments, shaped once for everyone who calls it (``megedit run`` and the wheel's wrapped
``batch_edit``): ``batch_edit``'s keywords for a list of requests, the locality dict, slicing them into chunks, and the
up-front check that every evaluation text fits EasyEdit's ``max_length``."""
from __future__ import annotations

from ..knowedit import first_item
from ..text import answered


def locality_inputs(locality_prompts, locality_ground_truth, n: int) -> dict | None:
    """The documented batch_edit arguments (lists) as EasyEdit's ``locality_inputs`` dict; a dict passes through."""
    if locality_prompts is None:
        return None
    if isinstance(locality_prompts, dict):
        if locality_ground_truth is not None:
            raise ValueError("locality_prompts is a locality_inputs dict; pass the answers inside it, not as "
                             "locality_ground_truth")
        return locality_prompts
    prompts = [locality_prompts] if isinstance(locality_prompts, str) else list(locality_prompts)
    answers = [locality_ground_truth] if isinstance(locality_ground_truth, str) else list(locality_ground_truth or [])
    if len(prompts) != n or len(answers) != n:
        raise ValueError(f"locality_prompts ({len(prompts)}) and locality_ground_truth ({len(answers)}) need one "
                         f"entry per edit ({n})")
    return {"neighborhood": {"prompt": prompts, "ground_truth": answers}}


def slice_locality(locality: dict | None, sl: slice) -> dict | None:
    if locality is None:
        return None
    out = {}
    for key, item in locality.items():
        prompts, answers = item["prompt"], item["ground_truth"]
        if isinstance(prompts, str):
            prompts, answers = [prompts], [answers]
        out[key] = {"prompt": list(prompts)[sl], "ground_truth": list(answers)[sl]}
    return out


def check_eval_lengths(tok, max_length: int, prompts, target_new, rephrase_prompts=None, locality=None,
                       case_ids=None) -> None:
    """EasyEdit's teacher-forced metrics (evaluate_utils.test_prediction_acc) tokenize ``prompt + ' ' + answer`` with
    ``truncation=True, max_length=hparams.max_length``: a longer pair is scored on a cut-off answer, and a prompt
    that fills ``max_length`` on its own leaves no answer and stops the whole call with an IndexError, after the
    editing work is done. Refuse such requests up front."""
    if not max_length or tok is None:
        return
    as_list = (lambda v: [v] if isinstance(v, str) else list(v or []))
    targets = as_list(target_new)
    pairs = [("prompt", i, p, targets[i]) for i, p in enumerate(as_list(prompts))]
    pairs += [("rephrase prompt", i, p, targets[i]) for i, p in enumerate(as_list(rephrase_prompts)) if p]
    for key, item in (locality or {}).items():
        pairs += [(f"locality prompt ({key})", i, p, a if isinstance(a, str) else str(a))
                  for i, (p, a) in enumerate(zip(as_list(item["prompt"]), as_list(item["ground_truth"]))) if p]
    lengths = [len(ids) for ids in tok([answered(p, a) for _, _, p, a in pairs])["input_ids"]] if pairs else []
    too_long = [(n, what, i, prompt) for n, (what, i, prompt, _) in zip(lengths, pairs) if n > max_length]
    if too_long:
        where = "; ".join(f"{f'case {case_ids[i]}' if case_ids is not None else f'edit {i}'}: {what} + answer is "
                          f"{n} tokens ({prompt[:60]!r})" for n, what, i, prompt in too_long[:5])
        raise ValueError(f"{len(too_long)} evaluation text(s) are longer than hparams.max_length={max_length}, which "
                         "EasyEdit's evaluation truncates them to (a prompt that fills it stops the run with an "
                         f"IndexError): set max_length to at least {max(lengths)}. {where}")


def sliced(values, sl: slice):
    """``values`` (one string or a list; None stays None) cut to ``sl``."""
    if values is None:
        return None
    return ([values] if isinstance(values, str) else list(values))[sl]


def neighbour(request: dict) -> dict:
    """The locality prompt EasyEdit's own numbers get: the neighbourhood one, else the first item of the first kind."""
    locality = request.get("locality") or {}
    return first_item(locality.get("neighborhood") or next(iter(locality.values()), {}))


def all_or_none(requests: list[dict], get, what: str):
    """EasyEdit takes a field for every request or for none."""
    values = [get(r) for r in requests]
    if all(values):
        return values
    if any(values):
        missing = [r["case_id"] for r, v in zip(requests, values) if not v][:5]
        raise ValueError(f"some requests have no {what} (case_ids {missing}...); EasyEdit needs it for all or none")
    return None


def batch_edit_inputs(requests: list[dict]) -> dict:
    """The arguments ``BaseEditor.batch_edit`` gets for ``requests``."""
    return dict(
        prompts=[r["prompt"] for r in requests], target_new=[r["target_new"] for r in requests],
        ground_truth=[r.get("ground_truth") or "<|endoftext|>" for r in requests],
        rephrase_prompts=all_or_none(requests, lambda r: r.get("rephrase_prompt"), "rephrase_prompt"),
        locality_prompts=all_or_none(requests, lambda r: neighbour(r).get("prompt"), "locality prompt"),
        locality_ground_truth=all_or_none(requests, lambda r: neighbour(r).get("ground_truth"), "locality answer"),
        subject=[r["subject"] for r in requests])


def with_evaluation_texts(apply, requests: list[dict]):
    """``apply_algo`` of a method that keeps its evaluation texts out of training (MeG), handed each request's full
    rephrase, locality and portability fields: ``batch_edit`` passes one locality prompt per request and no
    portability, so a KnowEdit or zsRE run would otherwise train on texts it is scored on (and not find the
    checkpoint ``megedit edit`` wrote for the same requests)."""
    full = {(r["prompt"], r.get("subject")): r for r in requests}
    fields = ("rephrase_prompt", "locality", "portability")

    def call(model, tok, batch, hparams, **kwargs):
        restored = []
        for r in batch:
            own = full.get((r["prompt"], r.get("subject")))
            if own is None:
                raise RuntimeError(f"EasyEdit passed an edit megedit did not send: {r['prompt']!r}")
            restored.append({**r, **{k: own[k] for k in fields if own.get(k)}})
        return apply(model, tok, restored, hparams, **kwargs)

    return call


def in_api_terms(api: str, inputs: dict) -> dict:
    """``batch_edit_inputs`` as keywords of the installed EasyEdit's ``batch_edit``, asking it to leave the edits on
    the model for megedit to score: the wheel keeps them with ``keep_original_weight=False``; the GitHub API ignores
    that keyword (and ``locality_prompts``/``locality_ground_truth``), restores the model after editing unless
    ``sequential_edit=True``, and takes locality as ``locality_inputs``."""
    if api == "wheel":
        return {**inputs, "keep_original_weight": False}
    rest = {k: v for k, v in inputs.items() if k not in ("locality_prompts", "locality_ground_truth")}
    locality = locality_inputs(inputs["locality_prompts"], inputs["locality_ground_truth"], len(inputs["prompts"]))
    return {**rest, "locality_inputs": locality, "sequential_edit": True}
