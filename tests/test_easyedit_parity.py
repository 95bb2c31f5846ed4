"""megedit's teacher-forced numbers equal EasyEdit's ``compute_edit_quality`` on the same model and requests,
for a plain model and for MeG's edited model coming out of ``BaseEditor.batch_edit`` (routed, as EasyEdit routes it,
on prompt + answer)."""
import contextlib
import importlib

import pytest

from megedit.easyedit import compat
from megedit.easyedit.loader import load_model_named
from megedit.evaluate import evaluate_requests, locality_reference, teacher_forced
from conftest import REQUESTS, meg_hparams, save_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread", "easyedit")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("parity") / "tiny-lm")


def half_right(model, tok, requests):
    """Requests whose targets are the model's own greedy continuation with the middle token swapped, so that the
    teacher-forced accuracies are fractions (an off-by-one in either evaluator would change them)."""
    out = []
    for r in requests:
        ids = tok(r["prompt"], return_tensors="pt").input_ids
        greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)[0, -3:].tolist()
        greedy[1] = tok.encode(" the")[0] if greedy[1] != tok.encode(" the")[0] else tok.encode(" a")[0]
        target = tok.decode(greedy).strip()
        out.append({**r, "target_new": target, "rephrase_prompt": r["prompt"] + ",",
                    "locality": {"neighborhood": {"prompt": r["locality"]["neighborhood"]["prompt"],
                                                  "ground_truth": target}}})
    return out


def easyedit_numbers(model, tok, requests, hp):
    evaluate = importlib.import_module("easyeditor.evaluate").compute_edit_quality
    with compat.runtime():
        return [evaluate(model, "tiny-lm", hp, tok, r, hp.device) for r in requests]


def test_plain_model_teacher_forced_parity(model_path):
    model, tok = load_model_named(model_path)
    requests = half_right(model, tok, REQUESTS)
    ours = evaluate_requests(model, tok, requests, locality_reference(model, tok, requests), batch_size=1,
                             progress=False)["per_request"]
    theirs = easyedit_numbers(model, tok, requests, meg_hparams(model_path))
    loc_prompts = [r["locality"]["neighborhood"]["prompt"] for r in requests]
    loc_tokens = teacher_forced(model, tok, loc_prompts, [r["target_new"] for r in requests], batch_size=1)
    for mine, ee, (pred, _) in zip(ours, theirs, loc_tokens):
        assert mine["rel_tf"] == pytest.approx(ee["rewrite_acc"][0])
        assert mine["gen_tf"] == pytest.approx(ee["rephrase_acc"][0])
        assert pred == ee["locality"]["neighborhood_output"][0]  # the tokens EasyEdit compares pre vs post
    assert any(0 < m["rel_tf"] < 1 for m in ours), "targets should be partly right, or the test proves little"


def test_easyedit_metrics_on_meg_through_baseeditor(model_path, monkeypatch):
    """EasyEdit's own evaluator runs unchanged on MeG's edited model; its numbers are megedit's TF routed as EasyEdit
    routes, on prompt + answer (megedit's own TF routes on the prompt alone: tests/test_prompt_routed_tf.py)."""
    import megedit.evaluate

    from easyeditor import BaseEditor

    editor = BaseEditor.from_hparams(meg_hparams(model_path))
    requests = REQUESTS  # targets MeG's neuron fits reach on this tiny model
    reference = locality_reference(editor.model, editor.tok, requests)
    metrics, edited, _ = editor.batch_edit(
        [r["prompt"] for r in requests], [r["target_new"] for r in requests],
        rephrase_prompts=[r["rephrase_prompt"] for r in requests],
        locality_prompts=[r["locality"]["neighborhood"]["prompt"] for r in requests],
        locality_ground_truth=[r["locality"]["neighborhood"]["ground_truth"] for r in requests],
        subject=[r["subject"] for r in requests],
        keep_original_weight=False, verbose=False)
    with monkeypatch.context() as m:  # no prompt-only decision held: the model routes on the whole fed text
        m.setattr(megedit.evaluate, "routed_on_prompts", lambda *a: contextlib.nullcontext())
        ours = evaluate_requests(edited, editor.tok, requests, reference, batch_size=1, progress=False)["per_request"]
    for mine, ee in zip(ours, metrics):
        assert mine["rel_tf"] == pytest.approx(ee["post"]["rewrite_acc"][0])
        assert mine["gen_tf"] == pytest.approx(ee["post"]["rephrase_acc"][0])
        assert mine["loc_tf"] == pytest.approx(ee["post"]["locality"]["neighborhood_acc"][0])
    assert [m["rel_tf"] for m in ours] != [m["pre"]["rewrite_acc"][0] for m in metrics], "MeG changed nothing"
