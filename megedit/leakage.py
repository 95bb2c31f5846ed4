"""Keep every evaluation text of an edit set out of training, however it got there.

Training texts are built from a pseudo-edit pool with the edit's subject swapped in, and datasets reuse their
wordings across facts (CounterFact's train and edit splits share relation templates, rephrasings and locality
prompts). So a view, a near miss, a gate negative or an encoder pair can be, or contain, an evaluation prompt of *any*
request in the edit set. ``HeldOutTexts`` holds all of them (rephrase, locality, portability, any named kind),
normalised (case, whitespace, punctuation), and says whether a training text leaks: it contains one of them, or one of
them contains it, on word boundaries.

Both containment checks use an index keyed by each text's rarest word, so 240,000 training texts against 100,000
evaluation texts take seconds, not a pairwise scan.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

# part of every checkpoint's run key: work saved under other rules for training texts is never resumed
RULES = "no evaluation text of the edit set (nor its sentence with the subject), normalised, by containment either way (v1)"
_NOT_WORD = re.compile(r"[^\w]+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n+")
_PROMPT_KEYS = ("rephrase_prompt", "rephrase_prompts")
_GROUPS = ("locality", "portability")


def normalise(text: str) -> tuple[str, ...]:
    """The text's words, lower-cased, with punctuation and whitespace runs as separators."""
    return tuple(w for w in _NOT_WORD.split(text.lower()) if w)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _prompts_in(value):
    """Every prompt under a locality/portability group, whatever its shape: {kind: {"prompt": str | [str]}},
    {kind: [{"prompt": ...}, ...]} (KnowEdit) or nested further."""
    if isinstance(value, dict):
        if "prompt" in value:
            yield from _strings(value["prompt"])
        else:
            for v in value.values():
                yield from _prompts_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _prompts_in(v)


def evaluation_prompts(request: dict) -> list[str]:
    """The request's evaluation prompts other than its own edit prompt: rephrasings, locality and portability.

    Where one holds the request's subject behind other sentences, the sentence with the subject is one too:
    CounterFact puts a random sentence before each rephrasing, and the same question behind another is the same test."""
    out = [t for key in _PROMPT_KEYS for t in _strings(request.get(key))]
    out += [t for group in _GROUPS for t in _prompts_in(request.get(group) or {})]
    subject = request.get("subject")
    if subject:
        out += [question for t in out if subject in t for question in [_sentence_from(t, t.find(subject))]
                if question != t]
    return [t for t in out if t and t.strip()]


def _sentence_from(text: str, at: int) -> str:
    """``text`` from the start of the sentence that holds position ``at``."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, at)]
    return text[ends[-1]:] if ends else text


class HeldOutTexts:
    """The evaluation texts of an edit set, and a tally of the training texts left out because they leak."""

    def __init__(self, requests: list[dict]):
        texts = {normalise(t) for r in requests for t in evaluation_prompts(r)}
        self.texts = sorted(t for t in texts if t)
        self.word_count = Counter(w for t in self.texts for w in t)
        # direction 1 (an evaluation text inside a training text): each evaluation text under its rarest word
        self.by_rarest: dict[str, list[tuple[tuple[str, ...], int]]] = defaultdict(list)
        # direction 2 (a training text inside an evaluation text): where each word occurs in the evaluation texts
        self.where: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for k, t in enumerate(self.texts):
            at = min(range(len(t)), key=lambda i: self.word_count[t[i]])
            self.by_rarest[t[at]].append((t, at))
            for i, w in enumerate(t):
                self.where[w].append((k, i))
        self.left_out: Counter = Counter()

    def __len__(self) -> int:
        return len(self.texts)

    def leaks(self, text: str) -> bool:
        """Whether ``text``, normalised, contains an evaluation text or lies inside one."""
        words = normalise(text)
        if not words:
            return False
        for i, w in enumerate(words):  # an evaluation text anchored at this word
            for t, at in self.by_rarest.get(w, ()):
                start = i - at
                if start >= 0 and words[start:start + len(t)] == t:
                    return True
        if any(w not in self.word_count for w in words):  # a word no evaluation text has: cannot lie inside one
            return False
        at = min(range(len(words)), key=lambda i: self.word_count[words[i]])
        for k, i in self.where[words[at]]:
            start = i - at
            if start >= 0 and self.texts[k][start:start + len(words)] == words:
                return True
        return False

    def keep(self, texts: list[str], kind: str) -> list[str]:
        """``texts`` without the leaking ones, which are counted under ``kind``."""
        kept = [t for t in texts if not self.leaks(t)]
        self.left_out[kind] += len(texts) - len(kept)
        return kept

    def keep_pairs(self, pairs: list[tuple[str, str]], kind: str) -> list[tuple[str, str]]:
        """(query, answer) pairs whose query and ``query answer`` both do not leak; the others counted under ``kind``."""
        kept = [(q, a) for q, a in pairs if not self.leaks(q) and not self.leaks(f"{q} {a}".strip())]
        self.left_out[kind] += len(pairs) - len(kept)
        return kept

    def report(self) -> dict:
        return {"evaluation_texts": len(self), "left_out": {k: v for k, v in sorted(self.left_out.items()) if v},
                "left_out_total": sum(self.left_out.values())}
