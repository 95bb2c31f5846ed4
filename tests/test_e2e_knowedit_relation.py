"""End to end on SmolLM2-135M-Instruct with real KnowEdit edits (validation part) and the relation check on: the edit
holds, and every edit prompt gets it (the check never refuses an edit's own question). Sizes are the SmolLM2 e2e
test's (about a minute of training on 2 cores).

Not yet asserted: that a question about the same subject's other relation (KnowEdit's Relation_Specificity) keeps the
unedited model's greedy answer. At these sizes the check kept 6 of 8 such answers (issue #17 asks for all but one).
"""
import pytest

from megedit import apply_meg_to_model, evaluate_requests, load_requests, locality_reference

from test_data import data_dir
from test_e2e_smollm2 import fast_smollm2

N_EDITS = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run():
    hp, model, tok = fast_smollm2(relation_check=True, familiarity_holdout=N_EDITS,
                                  relation_calibration_edits=100)  # 100 pool pseudo-edits and 8 edits: seconds
    requests = load_requests("knowedit", data_dir() / "knowedit" / "wiki_counterfact_train_cf.json", n=N_EDITS,
                             split="validation")
    reference = locality_reference(model, tok, requests)
    edited, _ = apply_meg_to_model(model, tok, requests, hp)
    post = evaluate_requests(edited, tok, requests, reference, progress=False)["summary"]
    print(f"\npost {post}\nrelation {edited.report['relation']}")
    return dict(requests=requests, edited=edited, post=post)


def test_the_edit_holds(run):
    post = run["post"]
    assert post["rel_tf"] >= 90 and post["rel_ag"] >= 75, post
    assert run["edited"].edit.applies([r["prompt"] for r in run["requests"]]).all()
