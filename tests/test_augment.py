"""PseudoEditPool on a slice of counterfact-train: views of an edit and its near misses of each kind."""
from collections import Counter

import pytest

from megedit.augment import NEAR_MISS_KINDS, PseudoEditPool, template_of
from megedit.data import load_requests

from test_data import data_dir

N_POOL, N_EDITS = 2000, 8


@pytest.fixture(scope="module")
def pool_requests():
    return load_requests("counterfact", data_dir() / "counterfact/counterfact-train.json", n=N_POOL)


@pytest.fixture(scope="module")
def edits():
    return load_requests("counterfact", data_dir() / "counterfact/counterfact-edit.json", n=N_EDITS)


@pytest.fixture(scope="module")
def pool(pool_requests, edits):
    """Built as train_meg builds it: the edits' subjects are excluded."""
    return PseudoEditPool(pool_requests, exclude_subjects={r["subject"] for r in edits}, seed=0)


def split_template(template: str) -> tuple[str, str]:
    before, after = template.format("\x00").split("\x00")
    return before, after


def slot(text: str, template: str) -> str | None:
    """What fills the subject slot of ``template`` in ``text`` (None if text is not that template)."""
    before, after = split_template(template)
    if len(text) > len(before) + len(after) and text.startswith(before) and text.endswith(after):
        return text[len(before): len(text) - len(after)]
    return None


def test_template_of():
    assert template_of("The capital of France is", "France") == "The capital of {} is"
    assert template_of("France, France is", "France") == "{}, France is"  # only the first occurrence
    assert template_of("a {b} c", "c").format("X") == "a {b} X"  # braces survive the round trip
    assert template_of("The capital of France is", "Spain") is None
    assert template_of("The capital of France is", None) is None


def test_pool_rejects_unusable_records():
    with pytest.raises(ValueError, match="no usable records"):
        PseudoEditPool([{"prompt": "x is", "subject": "y"}, {"prompt": "x is", "subject": None}])


def test_views_start_with_the_prompt_and_hold_the_subject(pool, edits):
    n_para, n_pre = 6, 2
    n_paraphrased = 0
    for r in edits:
        views = pool.views(r, n_para, n_pre)
        assert views[0] == r["prompt"]
        assert len(views) == len(set(views)) and 2 <= len(views) <= 1 + n_para + n_pre
        assert all(r["subject"] in v for v in views), views
        n_paraphrased += sum(template_of(v, r["subject"]) != template_of(r["prompt"], r["subject"]) for v in views)
    assert n_paraphrased > len(edits)  # not only the prompt behind prefixes: real rewordings


def test_views_never_contain_the_evaluation_rephrase(pool, edits):
    leaked = [r["case_id"] for r in edits
              if r["rephrase_prompt"] in pool.views(r, 6, 2) + pool.views(r, 6, 2, salt="calibration")]
    assert leaked == []


def test_views_are_deterministic(pool_requests, pool, edits):
    again = PseudoEditPool(pool_requests, exclude_subjects={r["subject"] for r in edits}, seed=0)
    other_seed = PseudoEditPool(pool_requests, exclude_subjects={r["subject"] for r in edits}, seed=1)
    first = [pool.views(r, 6, 2) for r in edits]
    assert first == [pool.views(r, 6, 2) for r in edits]  # the same pool twice
    assert first == [again.views(r, 6, 2) for r in edits]  # a rebuilt pool with the same seed
    assert first != [other_seed.views(r, 6, 2) for r in edits]
    assert first != [pool.views(r, 6, 2, salt="calibration") for r in edits]  # held-out views are drawn anew
    assert [pool.near_misses(r, 3) for r in edits] == [again.near_misses(r, 3) for r in edits]


def answer_overlap(pool_requests, exclude, t1, t2) -> float:
    """Share of answers two templates have in common (computed here from the raw pool, not by the pool)."""
    answers = {t1: Counter(), t2: Counter()}
    for r in pool_requests:
        t = template_of(r["prompt"], r["subject"])
        if t in answers and r["subject"] not in exclude and r["ground_truth"]:
            answers[t][r["ground_truth"]] += 1
    a, b = answers[t1], answers[t2]
    return sum((a & b).values()) / min(sum(a.values()), sum(b.values()))


def test_near_misses_have_the_right_shape(pool_requests, pool, edits):
    exclude = {r["subject"] for r in edits}
    pool_by_prompt = {}
    for r in pool_requests:
        if r["subject"] not in exclude:
            pool_by_prompt.setdefault(r["prompt"], []).append(r)
    n = 3
    for r in edits:
        subject, template = r["subject"], template_of(r["prompt"], r["subject"])
        near = pool.near_misses(r, n)
        assert set(near) == set(NEAR_MISS_KINDS)
        assert all(len(pairs) == n for pairs in near.values()), near
        for text, answer in near["same_relation"]:  # the edit's template, another subject
            other = slot(text, template)
            assert other is not None and other != subject, (text, template)
            assert other not in exclude
        for text, answer in near["same_subject"]:  # the edit's subject under a template of another answer type
            t = template_of(text, subject)
            assert t is not None and t != template and t in pool.by_template, text
            assert answer_overlap(pool_requests, exclude, t, template) <= 0.05, (text, r["prompt"])
        for text, answer in near["unrelated"]:  # neither: a pool prompt about another subject and template
            assert subject not in text and slot(text, template) is None, text
            assert text in pool_by_prompt and answer in {p["ground_truth"] for p in pool_by_prompt[text]}
        all_texts = [t for pairs in near.values() for t, _ in pairs]
        assert r["prompt"] not in all_texts and not set(all_texts) & set(pool.views(r, 6, 2))


def test_excluded_subjects_never_appear(pool_requests):
    by_template = {}
    for r in pool_requests:
        by_template.setdefault(template_of(r["prompt"], r["subject"]), []).append(r)
    template, group = max(by_template.items(), key=lambda kv: len(kv[1]))  # the most common template
    assert len(group) >= 20
    request = group[0]
    excluded = {r["subject"] for r in group[1::2]}  # half of the other subjects with this template
    plain = PseudoEditPool(pool_requests, seed=0)
    pool = PseudoEditPool(pool_requests, exclude_subjects=excluded, seed=0)
    assert not {it.subject for it in pool.items} & excluded

    def slot_subjects(p):
        near = p.near_misses(request, 15)
        return {slot(t, template) for t, _ in near["same_relation"]}

    assert slot_subjects(plain) & excluded  # without the exclusion they do turn up (the check can fail)
    got = slot_subjects(pool)
    assert len(got) == 15 and not got & excluded
    for text in pool.views(request, 6, 2) + [t for pairs in pool.near_misses(request, 15).values() for t, _ in pairs]:
        assert not any(s in text for s in excluded if len(s) > 6), text
