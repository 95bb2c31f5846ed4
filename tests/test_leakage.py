"""No evaluation text of the edit set reaches training: synthetic cases and the known CounterFact ones."""
import pytest

from megedit.encoder import training_columns
from megedit.hparams import MeGHyperParams
from megedit.leakage import HeldOutTexts, evaluation_prompts, normalise
from megedit.meg_main import build_texts, load_pool

from test_data import data_dir


def request(prompt, subject, rephrase=None, locality=None, portability=None, target="Paris"):
    return {"prompt": prompt, "subject": subject, "target_new": target, "ground_truth": "Rome",
            "rephrase_prompt": rephrase, "locality": locality or {}, "portability": portability or {}}


def test_normalise_ignores_case_whitespace_and_punctuation():
    assert normalise("  The  capital, of\nFRANCE is:") == normalise("the capital of france is") == \
        ("the", "capital", "of", "france", "is")
    assert normalise("?!") == ()


def test_containment_either_way_on_word_boundaries():
    held = HeldOutTexts([request("X is in", "X", rephrase="Where is the Eiffel Tower? It is in")])
    assert held.leaks("where is the eiffel tower it is in")  # the same text, normalised
    assert held.leaks("A long day. Where is the Eiffel Tower?  It is in Paris")  # it contains the evaluation text
    assert held.leaks("the Eiffel Tower? It is")  # it lies inside the evaluation text
    assert not held.leaks("Where is the Eiffel Tower located")  # shares words, neither contains the other
    assert not held.leaks("he Eiffel Tower")  # "he" is not the word "the": containment is on word boundaries
    assert not held.leaks("")


def test_every_kind_of_evaluation_text_is_held_out():
    # EasyEdit's {kind: {"prompt": str | [str]}} and KnowEdit's {kind: [{"prompt": ...}, ...]}, any kind names
    r = request("Ann plays", "Ann", rephrase="Which sport does Ann play?",
                locality={"Relation_Specificity": [{"prompt": "Ann was born in", "ground_truth": "Oslo"}],
                          "neighborhood": {"prompt": ["Bob plays", "Cid plays"], "ground_truth": ["a", "b"]}},
                portability={"Subject_Aliasing": [{"prompt": "Annie plays", "ground_truth": "golf"}],
                             "one_hop": {"prompt": "The sport of Ann's sister is", "ground_truth": "golf"}})
    assert set(evaluation_prompts(r)) == {"Which sport does Ann play?", "Ann was born in", "Bob plays", "Cid plays",
                                          "Annie plays", "The sport of Ann's sister is"}
    held = HeldOutTexts([r])
    for text in evaluation_prompts(r):
        assert held.leaks(f"Some prefix. {text} answer")
    assert not held.leaks("Ann plays")  # the edit prompt itself is not an evaluation text


def test_the_sentence_with_the_subject_behind_another_sentence_is_held_out():
    r = request("Ann plays", "Ann", rephrase="Nash the Slash, musician. Ann's favourite sport is")
    assert "Ann's favourite sport is" in evaluation_prompts(r)
    held = HeldOutTexts([r])
    assert held.leaks("By Jason Stein. Ann's favourite sport is")  # another prefix, the same test question
    r = request("The sport of Ann is", "Ann", rephrase="The favourite sport of Ann is")  # no sentence before it
    assert evaluation_prompts(r) == ["The favourite sport of Ann is"]


def test_evaluation_texts_of_other_requests_are_held_out_too():
    a = request("Ann plays", "Ann", rephrase="What Ann plays is")
    b = request("Bob plays", "Bob", locality={"neighborhood": {"prompt": "Cid plays", "ground_truth": "golf"}})
    held = HeldOutTexts([a, b])
    assert held.leaks("Cid plays golf")  # b's locality prompt, e.g. as a near miss of a
    assert held.keep(["Cid plays golf", "Dan plays", "What Ann plays is"], "near") == ["Dan plays"]
    assert held.keep_pairs([("Dan plays", "golf"), ("Eve says", "What Ann plays is")], "pairs") == [("Dan plays", "golf")]
    assert held.report()["left_out"] == {"near": 2, "pairs": 1} and held.report()["left_out_total"] == 3


def test_fast_at_scale():
    """100,000 evaluation texts and 240,000 training texts with a shared vocabulary: seconds, not a pairwise scan."""
    import time

    reqs = [request(f"s{i} plays", f"s{i}", rephrase=f"Which sport does s{i} play in the team",
                    locality={"n": {"prompt": f"The sport of s{i + 7} is", "ground_truth": "x"}}) for i in range(50_000)]
    t0 = time.time()
    held = HeldOutTexts(reqs)
    texts = [f"Some words. The team of s{i % 60_000} plays at home" for i in range(240_000)]
    kept = held.keep(texts, "views")
    assert len(held) == 100_000 and len(kept) == 240_000
    assert held.leaks("x. Which sport does s49999 play in the team today")
    assert time.time() - t0 < 60


@pytest.fixture(scope="module")
def counterfact_texts():
    hp = MeGHyperParams.from_hparams("hparams/MeG/smollm2-135m.yaml")
    hp = MeGHyperParams.from_dict({**hp.to_dict(), "pseudo_edit_data": str(data_dir() / "counterfact/counterfact-train.json")})
    edits = [r for r in __import__("megedit").load_requests("counterfact", data_dir() / "counterfact/counterfact-edit.json",
                                                            n=100)]
    pool = load_pool(edits, hp)
    unfiltered = build_texts(edits, pool, hp, HeldOutTexts([]))
    held = HeldOutTexts(edits)
    filtered = build_texts(edits, pool, hp, held)
    return hp, edits, pool, unfiltered, filtered, held


# CounterFact's edit and train splits share rephrasing wordings: these edits' own rephrasings (their sentence with the
# subject) came back as a training view of the same edit behind another context sentence
KNOWN = {173: "Chicago's twin city is known for",
         193: "Oslo's twin city has famous tourist attractions including",
         204: "Mehmed the Conqueror's religious values strongly emphasize",
         226: "Tizen is my favorite product out of everything created by"}


def test_the_known_counterfact_leaks_are_left_out(counterfact_texts):
    hp, edits, pool, unfiltered, filtered, held = counterfact_texts
    by_case = {r["case_id"]: e for e, r in enumerate(edits)}
    for case_id, question in KNOWN.items():
        e = by_case[case_id]
        assert question in edits[e]["rephrase_prompt"]
        assert any(v != question and v.endswith(question) for v in unfiltered.views[e][1:]), case_id  # before
        assert not any(question in v for v in filtered.views[e][1:]), case_id  # after
    trained = [t for v in filtered.views for t in v[1:]] + filtered.negatives + filtered.calib_familiar + \
        [t for ts in filtered.calib_unfamiliar.values() for t in ts]
    assert not [t for t in trained if held.leaks(t)]
    assert held.left_out["views"] >= len(KNOWN)
    # the gate's positives: each edit's own prompt (and prompt + target) is kept, whatever it resembles
    assert all(v[0] == r["prompt"] for v, r in zip(filtered.views, edits))


def test_encoder_pairs_that_leak_are_left_out(counterfact_texts):
    hp, edits, pool, unfiltered, filtered, held = counterfact_texts
    before = training_columns(pool, 3000, True, hp.seed)
    rows_before = list(zip(*before))
    leaking = [row for row in rows_before if any(held.leaks(t) for t in row)]
    assert leaking  # the pool's prompts include locality prompts of these edits
    count = HeldOutTexts(edits)
    after = training_columns(pool, 3000, True, hp.seed, count)
    assert len(after[0]) == len(rows_before) - len(leaking) == len(rows_before) - count.left_out["encoder_pairs"]
    assert not [t for col in after for t in col if held.leaks(t)]
