"""Metrics: teacher-forced accuracy (EasyEdit's definition), greedy generation, locality and the harmonic Score."""
import math

import pytest
import torch

from megedit.evaluate import METRICS, evaluate_requests, greedy, locality_reference, score, summarise, teacher_forced
from megedit.text import encode_answered

from conftest import tiny_model

REQUESTS = [  # EasyEdit request dicts, CounterFact style
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
     "rephrase_prompt": "France's capital city is",
     "locality": {"neighborhood": {"prompt": "The capital of Spain is", "ground_truth": "Madrid"}}},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano", "ground_truth": "guitar",
     "rephrase_prompt": "Toko Yasuda is incredible at",
     "locality": {"neighborhood": {"prompt": "John Lennon performs on the", "ground_truth": "guitar"}}},
    {"prompt": "Michel Denisot spoke the language", "subject": "Michel Denisot", "target_new": "Russian language",
     "ground_truth": "French", "rephrase_prompt": "Michel Denisot's mother tongue is",
     "locality": {"neighborhood": {"prompt": "The native language of Jean-Baptiste Say is",
                                   "ground_truth": "French (France)"}}},
]
PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Toko Yasuda, the"]
ANSWERS = ["English", "France and Spain", "piano player of the band"]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def by_hand(model, tok, prompt, answer):
    """EasyEdit: run prompt + " " + answer; the argmax at the position before each answer token."""
    ids = tok(prompt + " " + answer)["input_ids"]
    n = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return [int(logits[j - 1].argmax()) for j in range(n, len(ids))], ids[n:]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_teacher_forced_matches_a_hand_computation(arch, gpt2_tokenizer):
    model = tiny_model(arch)
    got = teacher_forced(model, gpt2_tokenizer, PROMPTS, ANSWERS, batch_size=2)  # one batch of 2, one of 1
    assert got == [by_hand(model, gpt2_tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS)]
    assert [len(gold) for _, gold in got] == [1, 3, 5]


def test_encode_answered_positions(gpt2_tokenizer):
    b = encode_answered(gpt2_tokenizer, PROMPTS, ANSWERS)
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        ids = gpt2_tokenizer(p + " " + a)["input_ids"]
        sel = b.answer_seq == i
        assert b.input_ids[i, b.answer_pos[sel] + 1].tolist() == b.answer_ids[sel].tolist() == ids[b.prompt_lengths[i]:]
        assert int(b.attention_mask[i].sum()) == len(ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_matches_generate(arch, gpt2_tokenizer):
    model, tok = tiny_model(arch), gpt2_tokenizer
    tok.padding_side = "right"
    out = greedy(model, tok, PROMPTS, [1, 3, 2], batch_size=2)
    assert tok.padding_side == "right"  # restored
    assert [len(o) for o in out] == [1, 3, 2]
    tok.padding_side = "left"
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        ref = model.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = "right"
    new = ref[:, enc["input_ids"].shape[1]:]
    assert out == [new[0, :1].tolist(), new[1, :3].tolist(), new[2, :2].tolist()]
    if arch == "llama":  # positions follow the attention mask: padded batches generate what single prompts do
        for p, o in zip(PROMPTS, out):
            single = tok(p, return_tensors="pt")
            alone = model.generate(**single, max_new_tokens=len(o), min_new_tokens=len(o), do_sample=False,
                                   pad_token_id=tok.pad_token_id)
            assert alone[0, single["input_ids"].shape[1]:].tolist() == o


def test_score_is_the_harmonic_mean():
    summary = dict(zip(METRICS, [100.0, 50.0, 25.0, 100.0, 80.0, 40.0]))
    assert score(summary) == pytest.approx(6 / sum(1 / v for v in summary.values()))
    assert score(dict.fromkeys(METRICS, 70.0)) == pytest.approx(70.0)
    assert score({**summary, "loc_ag": 0.0}) == 0.0
    assert math.isnan(score({k: v for k, v in summary.items() if k != "gen_tf"}))
    per = [dict.fromkeys(METRICS, 1.0), {**dict.fromkeys(METRICS, 1.0), "rel_tf": 0.0}]
    s = summarise(per)
    assert s["rel_tf"] == 50.0 and s["gen_tf"] == 100.0
    assert s["score"] == pytest.approx(6 / (5 / 100 + 1 / 50))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_locality_against_the_same_model_is_100(llama, gpt2_tokenizer):
    tok = gpt2_tokenizer
    ref = locality_reference(llama, tok, REQUESTS, batch_size=2)
    assert len(ref["tf"]) == len(ref["ag"]) == len(REQUESTS)
    out = evaluate_requests(llama, tok, REQUESTS, ref, batch_size=2, progress=False)
    assert out["summary"]["loc_tf"] == 100.0 and out["summary"]["loc_ag"] == 100.0
    assert set(out["summary"]) == {*METRICS, "score", "loc_tf.neighborhood", "loc_ag.neighborhood"}
    assert len(out["per_request"]) == len(REQUESTS)
    for r, per in zip(REQUESTS, out["per_request"]):  # reliability / generality are the hand-computed TF accuracy
        for key, prompt in (("rel_tf", r["prompt"]), ("gen_tf", r["rephrase_prompt"])):
            pred, gold = by_hand(llama, tok, prompt, r["target_new"])
            assert per[key] == sum(a == b for a, b in zip(pred, gold)) / len(gold)
        assert per["rel_ag"] in (0.0, 1.0)


def test_locality_of_another_model_is_not_100(llama, gpt2_tokenizer):
    ref = locality_reference(llama, gpt2_tokenizer, REQUESTS, batch_size=2)
    other = tiny_model("llama", seed=1)
    out = evaluate_requests(other, gpt2_tokenizer, REQUESTS, ref, batch_size=2, progress=False)
    assert out["summary"]["loc_tf"] < 100.0 and out["summary"]["loc_ag"] < 100.0


def test_without_reference_or_rephrase(llama, gpt2_tokenizer):
    reqs = [{**r, "rephrase_prompt": None} if i == 1 else r for i, r in enumerate(REQUESTS)]
    out = evaluate_requests(llama, gpt2_tokenizer, reqs, None, batch_size=2, progress=False)
    assert "loc_tf" not in out["summary"] and math.isnan(out["summary"]["score"])
    assert "gen_tf" not in out["per_request"][1] and "gen_tf" in out["per_request"][0]
