"""The relation check: after the gate, is a query about an edited subject asking the edited *relation*?

The familiarity gate judges a whole query embedding, and a query that names an edited subject looks familiar whatever
it asks ("The gender of X is" after editing "The occupation of X is"): KnowEdit's Relation_Specificity prompts passed
the gate 80% of the time. Once a query passes, the generated neuron rewrites whatever it asks. The check runs on the
queries the gate let through:

1. take the query's ``relation_top_k`` nearest edits (by the gate's keys: the edits' training views);
2. among them, the edits whose subject string occurs in the query (case-insensitive); none: the gate's decision stands
   (a query that names the subject by an alias, e.g. KnowEdit's Subject_Aliasing, is left to the gate);
3. cut the query to the sentence holding the subject and replace the subject by a placeholder (``relation_text``), and
   embed that with the tuned encoder;
4. let the query through only if that embedding comes within ``threshold`` (cosine) of the same masked text of one of
   those edits' training views; otherwise the unedited model answers;
5. with ``margin`` set, also refuse it when the masked prompt of some edit of another relation (any subject) is more
   than ``margin`` closer to it than those views and the named edit's relation's prompts are: the query asks a relation
   that another edit asks, not the named subject's edited one (a batch of edits names most relations a same-subject
   question can ask). Prompts are grouped into relations by the pool's answer types (templates whose pool answers
   overlap ask the same kind of thing: "X is owned by" and "X, by"); a template the pool lacks is a relation of its own.

The threshold is chosen like the gate's: on held-out calibration queries built from the pseudo-edit pool (the edits'
calibration views vs same-subject near misses under another template), never on evaluation data.
"""
from __future__ import annotations

import random
import re

import torch
import torch.nn as nn

from .augment import template_of
from .encoder import embed

MASK = "X"  # what stands for the subject in a masked text
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n+")


def find_subject(text: str, subject: str | None) -> int:
    """Where ``subject`` starts in ``text`` (case-insensitive), or -1; a subject of fewer than 2 characters never
    counts (it would be found everywhere)."""
    if not subject or len(subject.strip()) < 2:
        return -1
    return text.lower().find(subject.lower())


def relation_text(text: str, subject: str | None) -> str | None:
    """The sentence of ``text`` that holds ``subject``, with the subject replaced by ``MASK``; None when the subject is
    not in the text. CounterFact puts an unrelated sentence before some prompts: it says nothing of the relation."""
    at = find_subject(text, subject)
    if at < 0:
        return None
    start = 0
    for m in _SENTENCE_END.finditer(text, 0, at):
        start = m.end()
    end = at + len(subject)
    return (text[start:at] + MASK + text[end:]).strip()


class RelationCheck(nn.Module):
    """Buffers: ``keys`` (masked training views, fp16, (n_keys, dim)), ``key_edit`` (the edit of each key),
    ``threshold``, ``prompt_keys`` (the edits' distinct masked prompts, fp16, (n_prompts, dim)), ``prompt_family`` (the
    relation of each), ``prompt_of_edit`` (each edit's row there, -1 when its prompt does not name its subject) and
    ``margin`` (NaN: step 5 off); ``subjects``: each edit's subject. ``top_k``: how many nearest edits are asked."""

    def __init__(self, subjects: list[str], n_keys: int, dim: int, top_k: int = 3, n_prompts: int = 0):
        super().__init__()
        self.subjects = list(subjects)
        self.top_k = top_k
        self.register_buffer("keys", torch.zeros(n_keys, dim, dtype=torch.float16))
        self.register_buffer("key_edit", torch.zeros(n_keys, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("prompt_keys", torch.zeros(n_prompts, dim, dtype=torch.float16))
        self.register_buffer("prompt_family", torch.arange(n_prompts, dtype=torch.long))
        self.register_buffer("prompt_of_edit", torch.full((len(self.subjects),), -1, dtype=torch.long))
        self.register_buffer("margin", torch.tensor(float("nan")))

    @torch.no_grad()
    def prompt_similarity(self, sims: torch.Tensor, edits: list[int]) -> tuple[float, float]:
        """From one masked query's similarities to every prompt key (n_prompts,): the best among prompts of other
        relations than those of ``edits``, and among those of their relations (-2 when none). Both come from the same
        keys, so a query worded as its own edit's prompt ties exactly."""
        rows = [int(i) for i in self.prompt_of_edit[edits].tolist() if i >= 0]
        mine = torch.isin(self.prompt_family, self.prompt_family[rows]).to(sims.device)
        best = lambda m: float(sims[m].max()) if bool(m.any()) else -2.0  # noqa: E731
        return best(~mine), best(mine)

    @torch.no_grad()
    def similarity_to_edit(self, emb: torch.Tensor, edits: list[int]) -> torch.Tensor:
        """Best cosine similarity of each masked embedding (n, dim) to a masked view of its edit ``edits[i]``."""
        sims = emb.to(self.keys.device).float() @ self.keys.float().T  # (n, n_keys)
        own = self.key_edit[None, :] == torch.tensor(edits, device=self.keys.device)[:, None]  # (n, n_keys)
        return sims.masked_fill(~own, -2.0).max(dim=1).values.cpu()

    @torch.no_grad()
    def nearest_edits(self, emb: torch.Tensor, gate_keys: torch.Tensor, gate_key_edit: torch.Tensor) -> list[list[int]]:
        """Each query's ``top_k`` nearest edits, best first, by its most similar gate key (an edit's training view)."""
        sims = emb.to(gate_keys.device).float() @ gate_keys.float().T  # (B, n_gate_keys)
        owner = gate_key_edit.to(sims.device)[None, :].expand_as(sims)
        best = sims.new_full((len(emb), len(self.subjects)), -2.0).scatter_reduce(1, owner, sims, reduce="amax")
        k = min(self.top_k, len(self.subjects))
        return best.topk(k, dim=1).indices.cpu().tolist()

    @torch.no_grad()
    def explain(self, encoder, texts: list[str], emb: torch.Tensor, gate_keys: torch.Tensor,
                gate_key_edit: torch.Tensor) -> list[dict]:
        """Per text: ``subject_edits`` (nearest edits whose subject it names), ``relation_text``, ``similarity`` (best
        masked similarity to those edits' views, None when no subject is named) and ``allowed``."""
        out = []
        pending = []  # (row, masked text, edits)
        margin = float(self.margin)
        margin_on = margin == margin  # NaN: step 5 off
        for i, (text, near) in enumerate(zip(texts, self.nearest_edits(emb, gate_keys, gate_key_edit))):
            named = [e for e in near if find_subject(text, self.subjects[e]) >= 0]
            out.append({"nearest_edits": near, "subject_edits": named, "relation_text": None, "similarity": None,
                        "threshold": float(self.threshold), "allowed": True})
            if margin_on:
                out[-1].update(prompt_similarity=None, margin=margin)
            if named:
                masked = {relation_text(text, self.subjects[e]) for e in named}
                pending += [(i, m, named) for m in masked]
        if pending:
            masked_emb = embed(encoder, [m for _, m, _ in pending])
            # every pending text against every prompt key in one product (step 5 only)
            prompt_sims = masked_emb.to(self.keys.device).float() @ self.prompt_keys.float().T if margin_on else None
            for k, ((i, m, named), row) in enumerate(zip(pending, masked_emb)):
                sim = float(self.similarity_to_edit(row[None].expand(len(named), -1), named).max())
                if out[i]["similarity"] is None or sim > out[i]["similarity"]:
                    out[i].update(relation_text=m, similarity=sim)
                    if margin_on:
                        other, own_prompt = self.prompt_similarity(prompt_sims[k], named)
                        out[i].update(prompt_similarity=other, own_similarity=max(sim, own_prompt))
            for o in out:
                if o["similarity"] is not None:
                    o["allowed"] = o["similarity"] >= o["threshold"]
                    if margin_on:  # another edited relation is nearer than the named edit's own
                        o["allowed"] = o["allowed"] and o["own_similarity"] + margin >= o["prompt_similarity"]
        return out

    def allows(self, encoder, texts: list[str], emb: torch.Tensor, gate_keys: torch.Tensor,
               gate_key_edit: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which texts (all passed by the gate) keep the edit."""
        return torch.tensor([e["allowed"] for e in self.explain(encoder, texts, emb, gate_keys, gate_key_edit)],
                            dtype=torch.bool)


def _choose_threshold(familiar: torch.Tensor, near: torch.Tensor) -> dict:
    """The threshold with the best balanced accuracy (familiar let through, near misses blocked), in the middle of the
    range of equally good values."""
    values = torch.cat([familiar, near]).unique()
    grid = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    tpr = (familiar[None, :] >= grid[:, None]).float().mean(1) if len(familiar) else torch.ones(len(grid))
    tnr = (near[None, :] < grid[:, None]).float().mean(1) if len(near) else torch.zeros(len(grid))
    bal = (tpr + tnr) / 2
    top = torch.nonzero(bal >= bal.max() - 1e-9).squeeze(1)
    i = int(top[len(top) // 2])
    return {"threshold": float(grid[i]), "balanced_accuracy": float(bal[i]), "familiar_pass": float(tpr[i]),
            "same_subject_blocked": float(tnr[i]), "n_familiar": len(familiar), "n_same_subject": len(near)}


def calibration_texts(requests: list[dict], views: list[list[str]], pool, hp, held_out=None
                      ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(familiar, same-subject) calibration queries as (text, edit) pairs, from ``relation_calibration_edits`` edits:
    held-out views of the edit (salt "calibration", as the gate's), bare and with the new target, and its same-subject
    near misses of the gate's calibration draw (so the gate probe, which skips those, stays fresh)."""
    rng = random.Random(f"{hp.seed}|relation")
    edits = sorted(rng.sample(range(len(requests)), min(hp.relation_calibration_edits, len(requests))))
    familiar, near = [], []
    for e in edits:
        r = requests[e]
        seen = set(views[e])
        held = [t for t in pool.views(r, hp.n_paraphrase_views, hp.n_prefix_views, salt="calibration") if t not in seen]
        pairs = [(t, r["target_new"]) for t in held]
        if held_out is not None:
            pairs = held_out.keep_pairs(pairs, "relation.familiar")
        familiar += [(t, e) for t, _ in pairs[:3]] + [(f"{t} {a}", e) for t, a in pairs[:1]]
        pairs = pool.near_misses(r, 1, salt="calibration")["same_subject"]
        if held_out is not None:
            pairs = held_out.keep_pairs(pairs, "relation.same_subject")
        near += [(t, e) for t, _ in pairs] + [(f"{t} {a}".strip(), e) for t, a in pairs if a]
    return familiar, near


@torch.no_grad()
def fit_relation_check(encoder, requests: list[dict], views: list[list[str]], pool, hp,
                       held_out=None) -> tuple[RelationCheck, dict]:
    """The check for these edits: masked training views as keys; threshold chosen on calibration queries (or
    ``relation_threshold`` when set). ``views``: per edit, its prompt and training views (``TrainingTexts.views``)."""
    check = build_check(encoder, requests, views, hp.relation_top_k, pool)
    report: dict = {"keys": len(check.keys), "prompt_keys": len(check.prompt_keys),
                    "prompt_relations": len(check.prompt_family.unique())}
    if hp.relation_margin is not None:
        check.margin.fill_(hp.relation_margin)
        report["margin"] = hp.relation_margin
    if hp.relation_threshold is not None:
        check.threshold.fill_(hp.relation_threshold)
        report["threshold"] = hp.relation_threshold
        return check, report
    if pool is None:
        raise ValueError("the relation check chooses its threshold on pool near misses: set pseudo_edit_data, or set "
                         "relation_threshold")
    scores = {"familiar": [], "same_subject": []}
    if hp.relation_calibration in ("edits", "both"):
        familiar, near = calibration_texts(requests, views, pool, hp, held_out)
        for name, s in _scores(encoder, check, familiar, near).items():
            scores[name].append(s)
    if hp.relation_calibration in ("pool", "both"):
        pseudo, pseudo_views, familiar, near = pool_calibration(pool, hp, held_out)
        pseudo_check = build_check(encoder, pseudo, pseudo_views, hp.relation_top_k)
        for name, s in _scores(encoder, pseudo_check, familiar, near).items():
            scores[name].append(s)
    report.update(_choose_threshold(torch.cat(scores["familiar"]), torch.cat(scores["same_subject"])))
    report["calibration"] = hp.relation_calibration
    check.threshold.fill_(report["threshold"])
    return check, report


def prompt_families(templates: list[str | None], pool=None) -> list[int]:
    """A relation id per prompt template: templates whose pool answers overlap (``PseudoEditPool.same_answer_type``)
    share one, joined transitively; a template the pool lacks (or no pool) keeps its own."""
    family = list(range(len(templates)))

    def root(i: int) -> int:
        while family[i] != i:
            family[i] = family[family[i]]
            i = family[i]
        return i

    known = [i for i, t in enumerate(templates) if pool is not None and t in pool.answers]
    for a, i in enumerate(known):
        for j in known[a + 1:]:
            if root(i) != root(j) and pool.same_answer_type(templates[i], templates[j]):
                family[root(j)] = root(i)
    return [root(i) for i in range(len(templates))]


def build_check(encoder, requests: list[dict], views: list[list[str]], top_k: int, pool=None) -> RelationCheck:
    """A check (threshold and margin unset) whose keys are each edit's views, bare and followed by the new target (what
    a teacher-forced query routes on), cut to the subject's sentence and masked; its prompt keys are the edits'
    distinct masked prompts, grouped into relations by the pool's answer types (``prompt_families``)."""
    subjects = [r["subject"] for r in requests]
    keys, owner = [], []
    for e, v in enumerate(views):
        texts = [*v, *(f"{t} {requests[e]['target_new']}" for t in v)]
        masked = dict.fromkeys(m for m in (relation_text(t, subjects[e]) for t in texts) if m)
        keys += list(masked)
        owner += [e] * len(masked)
    masked_prompts = [relation_text(r["prompt"], r["subject"]) for r in requests]
    template = {}  # masked prompt -> the template of the first edit that has it
    for r, m in zip(requests, masked_prompts):
        if m:
            template.setdefault(m, template_of(r["prompt"], r["subject"]))
    prompts = list(template)
    row = {m: i for i, m in enumerate(prompts)}
    emb = embed(encoder, keys + prompts)
    check = RelationCheck(subjects, len(keys), emb.shape[1], top_k, len(prompts))
    check.keys.copy_(emb[:len(keys)].half())
    check.key_edit.copy_(torch.tensor(owner, dtype=torch.long))
    check.prompt_keys.copy_(emb[len(keys):].half())
    check.prompt_of_edit.copy_(torch.tensor([row.get(m, -1) for m in masked_prompts], dtype=torch.long))
    check.prompt_family.copy_(torch.tensor(prompt_families([template[m] for m in prompts], pool), dtype=torch.long))
    return check


def _scores(encoder, check: RelationCheck, familiar, near) -> dict[str, torch.Tensor]:
    """Each calibration query's masked similarity to its own edit's keys."""
    out = {}
    for name, pairs in (("familiar", familiar), ("same_subject", near)):
        masked = [(relation_text(t, check.subjects[e]), e) for t, e in pairs]
        masked = [(m, e) for m, e in masked if m]
        emb = embed(encoder, [m for m, _ in masked])
        out[name] = check.similarity_to_edit(emb, [e for _, e in masked]) if masked else torch.zeros(0)
    return out


def pool_calibration(pool, hp, held_out=None):
    """Calibration on pseudo-edits of the pool itself, where the dataset gives each a real paraphrase with other
    wording (an edit whose template the pool never rephrases has only prefixed copies of its prompt as views, which
    say nothing of how far a paraphrase strays): ``relation_calibration_edits`` pool records with a rephrasing, each
    a pseudo-edit whose keys are its training views (without its own rephrasing); familiar = its rephrasing, bare and
    answered; same-subject = its near misses of the calibration draw. Returns (pseudo-edits, their views, familiar,
    same-subject)."""
    rng = random.Random(f"{hp.seed}|relation-pool")
    items = [it for it in pool.items if it.rephrase and it.answer]
    items = rng.sample(items, min(hp.relation_calibration_edits, len(items)))
    pseudo, views, familiar, near = [], [], [], []
    for it in items:
        r = {"prompt": it.prompt, "subject": it.subject, "target_new": it.answer}
        v = [t for t in pool.views(r, hp.n_paraphrase_views, hp.n_prefix_views) if t != it.rephrase]
        e = len(pseudo)
        pseudo.append(r)
        views.append(v)
        pairs = [(it.rephrase, it.answer)]
        if held_out is not None:
            pairs = held_out.keep_pairs(pairs, "relation.pool_familiar")
        familiar += [(t, e) for t, _ in pairs] + [(f"{t} {a}", e) for t, a in pairs]
        pairs = pool.near_misses(r, 1, salt="calibration")["same_subject"]
        if held_out is not None:
            pairs = held_out.keep_pairs(pairs, "relation.pool_same_subject")
        near += [(t, e) for t, _ in pairs] + [(f"{t} {a}".strip(), e) for t, a in pairs if a]
    return pseudo, views, familiar, near


RELATION_FILES = ("relation.safetensors", "relation.json")


def save_relation(check: RelationCheck, folder) -> None:
    """Write the check into a saved edit's folder (``megedit.artifact`` hashes the files with the rest)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in check.state_dict().items()},
              str(folder / RELATION_FILES[0]))
    (folder / RELATION_FILES[1]).write_text(json.dumps({"subjects": check.subjects, "top_k": check.top_k}))


def load_relation(folder, device: str = "cpu") -> RelationCheck:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / RELATION_FILES[1]).read_text())
    state = load_file(str(folder / RELATION_FILES[0]))
    check = RelationCheck(meta["subjects"], state["keys"].shape[0], state["keys"].shape[1], meta["top_k"],
                          len(state.get("prompt_keys", ())))
    if "prompt_keys" not in state:  # an edit saved before prompt keys existed: step 5 stays off
        state.update(prompt_keys=check.prompt_keys, prompt_family=check.prompt_family,
                     prompt_of_edit=check.prompt_of_edit, margin=check.margin)
    check.load_state_dict(state)
    return check.to(device)


def explain_for_trace(edit, text: str, emb: torch.Tensor) -> dict:
    """The check's reasoning for one gate-passed ``text`` (embedding ``emb`` (1, dim)) of ``edit`` (a ``MeGEdit``), with
    the named edits spelled out (case id, prompt, subject) where the edit knows them."""
    check = edit.relation
    out = check.explain(edit.encoder, [text], emb, edit.familiarity.keys, torch.tensor(edit.key_edit))[0]
    known = edit.edits or []
    out["subject_edits"] = [{"edit": e, **(known[e] if e < len(known) else {"subject": check.subjects[e]})}
                            for e in out["subject_edits"]]
    out["subject_edits"] = [{"case_id": d.get("case_id", d["edit"]), **d} for d in out["subject_edits"]]
    return out
