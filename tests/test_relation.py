"""The relation check (megedit/relation.py): the masked text, the choice of nearest edits and threshold, its place in
the routing, the saved edit and the trace — on a bag-of-words stand-in encoder and on a tiny real MeG edit."""
import re
import zlib

import pytest
import torch

from megedit.augment import PseudoEditPool
from megedit.data import load_requests
from megedit.leakage import HeldOutTexts
from megedit.model import MeGModel
from megedit.relation import (RelationCheck, _choose_threshold, calibration_texts, fit_relation_check, pool_calibration,
                              relation_text)
from megedit.trace import format_trace, trace_query

from tiny_meg import EDITS, pool_file, tiny_base, tiny_hparams

pytestmark = pytest.mark.usefixtures("single_thread")


class BagOfWords:
    """A stand-in sentence encoder: each lower-cased word hashed into one of 256 dimensions."""

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        out = torch.zeros(len(texts), 256)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, zlib.crc32(w.encode()) % 256] += 1
        return out


def test_relation_text_masks_the_subject_in_its_sentence():
    assert relation_text("The mother tongue of Danielle Darrieux is", "Danielle Darrieux") == \
        "The mother tongue of X is"
    # case-insensitive; the sentence before the subject's is dropped, what follows is kept
    assert relation_text("It rained. danielle darrieux spoke the language. Yes", "Danielle Darrieux") == \
        "X spoke the language. Yes"
    assert relation_text("The mother tongue of Dani D. is", "Danielle Darrieux") is None  # an alias: not found
    assert relation_text("anything", "") is None and relation_text("a b", "a") is None  # no 1-letter subjects


def _check(texts_per_edit, subjects, top_k=2, threshold=0.9):
    enc = BagOfWords()
    from megedit.encoder import embed

    masked = [relation_text(t, subjects[e]) for e, ts in enumerate(texts_per_edit) for t in ts]
    owner = [e for e, ts in enumerate(texts_per_edit) for _ in ts]
    check = RelationCheck(subjects, len(masked), 256, top_k)
    check.keys.copy_(embed(enc, masked).half())
    check.key_edit.copy_(torch.tensor(owner))
    check.threshold.fill_(threshold)
    gate_texts = [t for ts in texts_per_edit for t in ts]
    return enc, check, embed(enc, gate_texts).half(), torch.tensor(owner)


def test_check_refuses_another_relation_of_a_named_subject_only():
    edits = [["The mother tongue of Danielle Darrieux is", "Danielle Darrieux's mother tongue is"],
             ["Toko Yasuda plays the", "Toko Yasuda is a player of the"]]
    enc, check, gate_keys, gate_owner = _check(edits, ["Danielle Darrieux", "Toko Yasuda"])
    from megedit.encoder import embed

    queries = ["The mother tongue of Danielle Darrieux is",  # the edit itself
               "Danielle Darrieux was born in the city of",  # same subject, other relation
               "The mother tongue of Danielle D. is",  # no subject string (an alias): the gate's decision stands
               "Toko Yasuda works in the city of"]  # the second edit's subject
    out = check.explain(enc, queries, embed(enc, queries), gate_keys, gate_owner)
    assert [o["allowed"] for o in out] == [True, False, True, False]
    assert out[0]["subject_edits"] == [0] and out[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert out[1]["relation_text"] == "X was born in the city of" and out[1]["similarity"] < 0.9
    assert out[2]["subject_edits"] == [] and out[2]["similarity"] is None
    assert out[3]["subject_edits"] == [1]
    assert check.allows(enc, queries, embed(enc, queries), gate_keys, gate_owner).tolist() == [True, False, True, False]
    # top_k 1: a query nearest to edit 0 that names only edit 1's subject is left to the gate
    check.top_k = 1
    q = ["The mother tongue of Toko Yasuda is"]
    near = check.nearest_edits(embed(enc, q), gate_keys, gate_owner)
    assert near == [[0]] and check.explain(enc, q, embed(enc, q), gate_keys, gate_owner)[0]["subject_edits"] == []


def test_margin_refuses_a_relation_that_another_edit_asks(tmp_path):
    from megedit.encoder import embed
    from megedit.relation import build_check, load_relation, save_relation

    enc = BagOfWords()
    requests = [{"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
                 "target_new": "English"},
                {"prompt": "The twin city of Toko Yasuda is", "subject": "Toko Yasuda", "target_new": "Rome"}]
    views = [[requests[0]["prompt"], "Danielle Darrieux's mother tongue is"], [requests[1]["prompt"]]]
    check = build_check(enc, requests, views, top_k=2)
    assert len(check.prompt_keys) == 2 and float(check.margin) != float(check.margin)  # NaN: step 5 off
    check.threshold.fill_(0.5)  # loose: "of X is" alone brings a query near edit 0
    gate_texts = [t for v in views for t in v]
    gate_owner = torch.tensor([e for e, v in enumerate(views) for _ in v])
    gate_keys = embed(enc, gate_texts).half()
    queries = ["The twin city of Danielle Darrieux is",  # edit 1's relation asked of edit 0's subject
               "Danielle Darrieux's mother tongue is",  # the edit under another wording
               "The mother tongue of Danielle Darrieux is"]  # the edit itself
    emb = embed(enc, queries)
    assert check.allows(enc, queries, emb, gate_keys, gate_owner).tolist() == [True, True, True]
    check.margin.fill_(0.0)
    out = check.explain(enc, queries, emb, gate_keys, gate_owner)
    assert [o["allowed"] for o in out] == [False, True, True]
    assert out[0]["similarity"] >= 0.5 and out[0]["prompt_similarity"] == pytest.approx(1.0, abs=1e-3)
    # views and prompts are embedded in other batches (other rounding): an edit's own prompt must still win its tie
    check.keys.mul_(0.999)
    assert check.allows(enc, queries, emb, gate_keys, gate_owner).tolist() == [False, True, True]
    check.margin.fill_(1.0)  # a wide margin: only the threshold decides again
    assert check.allows(enc, queries, emb, gate_keys, gate_owner).tolist() == [True, True, True]
    # saved and loaded with its prompt keys and margin; a check saved before they existed keeps step 5 off
    save_relation(check, tmp_path)
    loaded = load_relation(tmp_path)
    assert torch.equal(loaded.prompt_keys, check.prompt_keys) and float(loaded.margin) == 1.0
    from safetensors.torch import load_file, save_file

    old = {k: v for k, v in load_file(str(tmp_path / "relation.safetensors")).items()
           if k not in ("prompt_keys", "margin")}
    save_file(old, str(tmp_path / "relation.safetensors"))
    loaded = load_relation(tmp_path)
    assert len(loaded.prompt_keys) == 0 and float(loaded.margin) != float(loaded.margin)
    assert loaded.allows(enc, queries, emb, gate_keys, gate_owner).tolist() == [True, True, True]


def test_margin_counts_prompts_of_the_same_relation_as_the_edit_s_own():
    from megedit.encoder import embed
    from megedit.relation import build_check, prompt_families

    pool = PseudoEditPool([{"prompt": p, "subject": s, "ground_truth": a} for p, s, a in (
        ("Ann Lee's mother tongue is", "Ann Lee", "French"), ("The native language of Bo Ro is", "Bo Ro", "French"),
        ("The twin city of Kyiv is", "Kyiv", "Rome"))])
    assert prompt_families(["{}'s mother tongue is", "{} plays", "The native language of {} is",
                            "The twin city of {} is"], pool) == [0, 1, 0, 3]
    assert prompt_families(["{}'s mother tongue is", "The native language of {} is"]) == [0, 1]  # no pool
    enc = BagOfWords()
    requests = [{"prompt": "Danielle Darrieux's mother tongue is", "subject": "Danielle Darrieux", "target_new": "English"},
                {"prompt": "The native language of Toko Yasuda is", "subject": "Toko Yasuda", "target_new": "Dutch"},
                {"prompt": "The twin city of Paris is", "subject": "Paris", "target_new": "Rome"}]
    views = [[r["prompt"]] for r in requests]
    gate_keys, gate_owner = embed(enc, [v[0] for v in views]).half(), torch.arange(3)
    queries = ["The native language of Danielle Darrieux is",  # edit 0's relation in edit 1's wording
               "The twin city of Danielle Darrieux is"]  # another relation
    emb = embed(enc, queries)
    for with_pool, expected in ((pool, [True, False]), (None, [False, False])):
        check = build_check(enc, requests, views, top_k=3, pool=with_pool)
        check.threshold.fill_(0.3)
        check.margin.fill_(0.0)
        assert check.allows(enc, queries, emb, gate_keys, gate_owner).tolist() == expected


def test_threshold_is_the_middle_of_the_best_range():
    got = _choose_threshold(torch.tensor([0.9, 0.95, 1.0]), torch.tensor([0.3, 0.5]))
    assert got["threshold"] == pytest.approx(0.7) and got["balanced_accuracy"] == 1.0
    assert got["familiar_pass"] == 1.0 and got["same_subject_blocked"] == 1.0
    got = _choose_threshold(torch.tensor([0.9, 0.4]), torch.tensor([0.5]))  # overlap: the best trade-off
    assert 0.5 < got["threshold"] < 0.9 and got["balanced_accuracy"] == 0.75


def test_calibration_and_keys_come_from_the_pool_never_from_evaluation_texts(tmp_path):
    hp = tiny_hparams(tmp_path, relation_check=True, relation_calibration_edits=4, relation_calibration="edits")
    pool = PseudoEditPool(load_requests("auto", str(pool_file(tmp_path))), seed=hp.seed)
    requests = [dict(r) for r in EDITS]
    # an evaluation text that a calibration view would otherwise be: it must be left out
    views = [[r["prompt"]] + pool.views(r, hp.n_paraphrase_views, hp.n_prefix_views)[1:] for r in requests]
    familiar, near = calibration_texts(requests, views, pool, hp)
    assert familiar and near
    leaked = familiar[0][0]  # lies inside an evaluation text: a near-copy of it
    requests[familiar[0][1]] = {**requests[familiar[0][1]], "rephrase_prompt": f"{leaked} indeed"}
    held_out = HeldOutTexts(requests)
    familiar2, near2 = calibration_texts(requests, views, pool, hp, held_out)
    assert leaked not in [t for t, _ in familiar2] and held_out.left_out["relation.familiar"] >= 1
    for t, e in near2:  # another relation of the same subject
        assert requests[e]["subject"] in t
    check, report = fit_relation_check(BagOfWords(), requests, views, pool, hp, held_out)
    assert report["keys"] == len(check.keys) and set(check.key_edit.tolist()) == set(range(len(requests)))
    assert 0 <= report["familiar_pass"] <= 1 and report["n_same_subject"] == len(near2)
    assert float(check.threshold) == pytest.approx(report["threshold"])
    fixed, report = fit_relation_check(BagOfWords(), requests, views, None, hp.replace(relation_threshold=0.5))
    assert float(fixed.threshold) == 0.5 and report["threshold"] == 0.5


def test_pool_calibration_uses_real_rephrasings_that_are_not_keys(tmp_path):
    hp = tiny_hparams(tmp_path, relation_check=True, relation_calibration_edits=5, relation_calibration="edits")
    pool = PseudoEditPool(load_requests("auto", str(pool_file(tmp_path))), seed=hp.seed)
    pseudo, views, familiar, near = pool_calibration(pool, hp)
    assert len(pseudo) == len(views) == 5 and familiar and near
    rephrasings = {it.prompt: it.rephrase for it in pool.items}
    for t, e in familiar:
        assert t.startswith(rephrasings[pseudo[e]["prompt"]]) and rephrasings[pseudo[e]["prompt"]] not in views[e]
    for t, e in near:
        assert pseudo[e]["subject"] in t and pseudo[e]["prompt"] not in t
    _, both = fit_relation_check(BagOfWords(), list(EDITS), [[r["prompt"]] for r in EDITS], pool,
                                 hp.replace(relation_calibration="both"))
    _, edits_only = fit_relation_check(BagOfWords(), list(EDITS), [[r["prompt"]] for r in EDITS], pool, hp)
    assert both["n_familiar"] == edits_only["n_familiar"] + len(familiar) and both["calibration"] == "both"


@pytest.fixture(scope="module")
def tiny_edit(tmp_path_factory):
    from megedit.meg_main import apply_meg_to_model

    folder = tmp_path_factory.mktemp("relation")
    model, tok = tiny_base()
    hp = tiny_hparams(folder, relation_check=True, relation_calibration_edits=20)
    edited, _ = apply_meg_to_model(model, tok, EDITS, hp, progress=False)
    return edited, tok, folder


QUERIES = [r["prompt"] for r in EDITS] + ["Danielle Darrieux was born in", "Toko Yasuda works for",
                                           "The mother tongue of Dani D. is"]


def test_trained_edit_has_the_check_and_saves_it(tiny_edit):
    edited, tok, folder = tiny_edit
    rel = edited.report["relation"]
    assert edited.edit.relation is not None and rel["n_familiar"] > 0 and rel["n_same_subject"] > 0
    assert "relation_check" in edited.report["seconds"]
    loaded = MeGModel.from_pretrained(tiny_base()[0], tok, edited.save_pretrained(folder / "edit"))
    for name, t in edited.edit.relation.state_dict().items():
        torch.testing.assert_close(t, loaded.edit.relation.state_dict()[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert loaded.edit.relation.subjects == [r["subject"] for r in EDITS]
    assert torch.equal(loaded.edit.applies(QUERIES), edited.edit.applies(QUERIES))


def test_refused_query_gets_the_unedited_model_and_the_trace_says_why(tiny_edit):
    edited, tok, _ = tiny_edit
    gate, check = edited.edit.familiarity, edited.edit.relation
    saved = (gate.epsilon.clone(), gate.tau.clone(), check.threshold.clone())
    try:  # a gate that passes everything, and a strict check: the check alone decides
        gate.epsilon.fill_(float("inf"))
        gate.tau.fill_(-1.0)
        check.threshold.fill_(0.99)
        applied = edited.edit.applies(QUERIES).tolist()
        assert applied == [True] * len(EDITS) + [False, False, True]
        enc = tok(QUERIES[len(EDITS)], return_tensors="pt")
        base = tiny_base()[0]
        with torch.no_grad():
            assert torch.equal(edited(**enc).logits, base(**enc).logits)  # refused: exactly the unedited model
            enc = tok(EDITS[0]["prompt"], return_tensors="pt")
            assert not torch.equal(edited(**enc).logits, base(**enc).logits)  # the edit itself still gets the neuron
        refused = trace_query(edited, QUERIES[len(EDITS)], max_new_tokens=2)
        assert refused["familiar"] and not refused["edit_applied"] and not refused["relation_check"]["allowed"]
        assert refused["relation_check"]["subject_edits"][0]["case_id"] == EDITS[0]["case_id"]
        text = format_trace(refused)
        assert "relation check" in text and "refused" in text and "X was born in" in text
        alias = trace_query(edited, QUERIES[-1], max_new_tokens=2)
        assert alias["edit_applied"] and alias["relation_check"]["similarity"] is None
        assert "gate's decision stands" in format_trace(alias)
        kept = trace_query(edited, EDITS[0]["prompt"], max_new_tokens=2)
        assert kept["edit_applied"] and "applied" in format_trace(kept)
        # the margin rule alone: edit 1's relation asked of edit 0's subject is refused, and the trace says so
        check.threshold.fill_(-1.0)
        check.margin.fill_(0.0)
        other = trace_query(edited, "The official religion of Danielle Darrieux is", max_new_tokens=2)
        assert [e["case_id"] for e in other["relation_check"]["subject_edits"]] == [EDITS[0]["case_id"]]
        assert not other["edit_applied"] and other["relation_check"]["prompt_similarity"] > 0.99
        assert "another edit's prompt is nearer" in format_trace(other)
        assert trace_query(edited, EDITS[0]["prompt"], max_new_tokens=2)["edit_applied"]
    finally:
        gate.epsilon.copy_(saved[0])
        gate.tau.copy_(saved[1])
        check.threshold.copy_(saved[2])
        check.margin.fill_(float("nan"))
