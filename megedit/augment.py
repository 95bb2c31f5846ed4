"""Texts that teach each stage what an edit's queries look like, built from a pool of pseudo-edits.

The pool is a training split disjoint from the edits (e.g. ``counterfact-train.json``). From it we learn, per prompt
template (the prompt with its subject replaced by ``{}``), how the dataset rephrases that template, and which templates
ask for a different kind of answer. For an edit that gives:

- **views** (familiar): the prompt, the prompt behind a context prefix, and pool rephrasings of the same template with the
  edit's subject swapped in. The edit's own ``rephrase_prompt`` is evaluation data and is never used.
- **near misses** (unfamiliar): the same template with another subject (``same_relation``), the edit's subject under a
  template with another answer type (``same_subject``), and unrelated pool prompts (``unrelated``).
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

NEAR_MISS_KINDS = ("same_relation", "same_subject", "unrelated")
_PREFIX_END = re.compile(r"[.!?\"')\]]\s$|\n$")


def template_of(prompt: str, subject: str | None) -> str | None:
    if not subject or subject not in prompt:
        return None
    return prompt.replace("{", "{{").replace("}", "}}").replace(subject, "{}", 1)


def _fill(template: str, subject: str) -> str:
    return template.format(subject)


def evaluation_texts(request: dict) -> set[str]:
    """The request's own evaluation prompts (rephrase, locality, portability): never a training text.

    Needed because CounterFact reuses the same rephrase wordings across facts of a relation, so a pool rephrasing with
    the edit's subject swapped in can be, word for word, the edit's own evaluation prompt.
    """
    out = {request.get("rephrase_prompt")}
    for group in ("locality", "portability"):
        for item in (request.get(group) or {}).values():
            prompts = item.get("prompt") if isinstance(item, dict) else None
            out.update(prompts if isinstance(prompts, list) else [prompts])
    return {t for t in out if t}


@dataclass
class _PoolItem:
    prompt: str
    subject: str
    template: str
    rephrase: str | None
    answer: str | None


class PseudoEditPool:
    """Indexes a pool of pseudo-edit requests (EasyEdit dicts) for building views and near misses."""

    def __init__(self, requests: list[dict], exclude_subjects: set[str] = frozenset(), seed: int = 0):
        self.items: list[_PoolItem] = []
        for r in requests:
            subject = r.get("subject")
            template = template_of(r["prompt"], subject)
            if template is None or subject in exclude_subjects:
                continue
            rephrase = r.get("rephrase_prompt")
            self.items.append(_PoolItem(r["prompt"], subject, template, rephrase if rephrase and subject in rephrase else None,
                                        r.get("ground_truth")))
        if not self.items:
            raise ValueError("the pseudo-edit pool has no usable records (each needs a subject inside its prompt)")
        self.by_template: dict[str, list[_PoolItem]] = defaultdict(list)
        for it in self.items:
            self.by_template[it.template].append(it)
        # the answers each template receives: templates whose answers overlap ask for the same kind of thing
        self.answers = {t: Counter(it.answer for it in its if it.answer) for t, its in self.by_template.items()}
        self.prefixes = sorted({p for it in self.items if it.rephrase
                                for p in [it.rephrase[: it.rephrase.find(it.subject)]] if _PREFIX_END.search(p)})
        self.templates = sorted(self.by_template)
        self.seed = seed

    def _rng(self, request: dict, salt: str) -> random.Random:
        return random.Random(f"{self.seed}|{salt}|{request['prompt']}|{request.get('subject')}")

    def same_answer_type(self, t1: str, t2: str) -> bool:
        a, b = self.answers.get(t1, Counter()), self.answers.get(t2, Counter())
        if not a or not b:
            return False
        overlap = sum((a & b).values())
        return overlap / min(sum(a.values()), sum(b.values())) > 0.05

    def views(self, request: dict, n_paraphrases: int, n_prefixed: int, salt: str = "views") -> list[str]:
        """The prompt, then up to ``n_paraphrases`` pool rephrasings and ``n_prefixed`` prefixed prompts.

        Another ``salt`` draws other donors and prefixes (held-out calibration views)."""
        rng = self._rng(request, salt)
        subject, prompt = request.get("subject"), request["prompt"]
        out = [prompt]
        template = template_of(prompt, subject)
        donors = [it for it in self.by_template.get(template, []) if it.rephrase]
        rng.shuffle(donors)
        seen_cores = set()
        for it in donors:  # prefer rephrasings with different wording (the part from the subject on)
            core = it.rephrase[it.rephrase.find(it.subject):].replace(it.subject, "{}", 1)
            if core in seen_cores:
                continue
            seen_cores.add(core)
            out.append(it.rephrase.replace(it.subject, subject))
            if len(out) > n_paraphrases:
                break
        if len(out) <= n_paraphrases:  # few distinct wordings: repeat them behind other prefixes
            for it in donors:
                if len(out) > n_paraphrases:
                    break
                core = it.rephrase[it.rephrase.find(it.subject):].replace(it.subject, subject, 1)
                out.append(rng.choice(self.prefixes) + core if self.prefixes else core)
        for _ in range(n_prefixed):
            if self.prefixes:
                out.append(rng.choice(self.prefixes) + prompt)
        held_out = evaluation_texts(request)
        return [t for t in dict.fromkeys(out) if t not in held_out or t == prompt]

    def near_misses(self, request: dict, n: int, salt: str = "near") -> dict[str, list[tuple[str, str]]]:
        """Up to ``n`` (query, plausible answer) pairs of each near-miss kind for ``request``."""
        rng = self._rng(request, salt)
        subject, prompt = request.get("subject"), request["prompt"]
        template = template_of(prompt, subject)
        out: dict[str, list[tuple[str, str]]] = {k: [] for k in NEAR_MISS_KINDS}
        if template is not None:
            others = [it for it in self.by_template.get(template, []) if it.subject != subject]
            out["same_relation"] = [(it.prompt, it.answer or "") for it in rng.sample(others, min(n, len(others)))]
            if len(out["same_relation"]) < n:  # the template is rare in the pool: fill it with pool subjects
                donors = [it for it in rng.sample(self.items, min(4 * n, len(self.items))) if it.subject != subject]
                out["same_relation"] += [(_fill(template, it.subject), request.get("ground_truth") or "")
                                         for it in donors][: n - len(out["same_relation"])]
            foreign = [t for t in rng.sample(self.templates, len(self.templates))
                       if t != template and not self.same_answer_type(t, template)]
            out["same_subject"] = [(_fill(t, subject), rng.choice(self.by_template[t]).answer or "") for t in foreign[:n]]
        unrelated = [(it.prompt, it.answer or "") for it in rng.sample(self.items, min(3 * n, len(self.items)))
                     if it.subject != subject and it.template != template]
        out["unrelated"] = unrelated[:n]
        held_out = evaluation_texts(request)
        return {k: [(t, a) for t, a in pairs if t not in held_out] for k, pairs in out.items()}
