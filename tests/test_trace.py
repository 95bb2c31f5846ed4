"""`megedit ask` and trace_query on a tiny saved edit: the gate's numbers and decision, the nearest edits, the answers
with and without the edit."""
import json

import pytest
import torch

from megedit.cli import main
from megedit.model import MeGModel
from megedit.trace import format_trace, trace_query

from tiny_meg import EDITS, UNRELATED, saved_tiny_edit, tiny_base

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real MeG edit on a tiny llama, saved, and its base model saved as a model folder (for --model)."""
    folder = tmp_path_factory.mktemp("trace")
    edited, tok, edit_dir = saved_tiny_edit(folder)
    base = tiny_base()[0]
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    return edited, tok, edit_dir, folder / "base"


def greedy(model, tok, text, n=10):
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_trace_explains_the_routing_and_answers(saved):
    edited, tok, _, _ = saved
    traces = [trace_query(edited, q, k=2) for q in [r["prompt"] for r in EDITS] + UNRELATED]
    assert {t["familiar"] for t in traces} == {True, False}  # both decisions occur: the checks below can fail
    for t in traces:
        assert t["familiar"] == (t["entropy_below_epsilon"] and t["similarity_reaches_tau"])
        assert t["familiar"] == bool(edited.edit.route([t["routed_text"]]).rows.numel())
        assert t["epsilon"] == float(edited.edit.familiarity.epsilon) and t["tau"] == float(edited.edit.familiarity.tau)
        assert t["answer_unedited"] == greedy(tiny_base()[0], tok, t["question"])  # the base model, untouched
        assert t["answer_edited"] == greedy(edited, tok, t["question"])
        if not t["familiar"]:
            assert t["answer_edited"] == t["answer_unedited"]
        assert len(t["nearest_edits"]) == 2 and t["nearest_edits"][0]["similarity"] >= t["nearest_edits"][1]["similarity"]
        assert t["nearest_edits"][0]["similarity"] == pytest.approx(t["similarity"], abs=1e-3)  # keys are fp16
    for r, t in zip(EDITS, traces):  # an edit prompt is one of its own views: its nearest edit is itself
        first = t["nearest_edits"][0]
        assert (first["case_id"], first["prompt"], first["target_new"]) == (r["case_id"], r["prompt"], r["target_new"])
        assert first["similarity"] == pytest.approx(1.0, abs=1e-2)
    text = format_trace(traces[0])
    assert "gate: entropy" in text and "decision:" in text and f"case {EDITS[0]['case_id']}" in text
    with pytest.raises(ValueError, match="non-empty string"):
        trace_query(edited, "  ")


def test_saved_edit_keeps_what_it_edited(saved):
    edited, tok, edit_dir, _ = saved
    reloaded = MeGModel.from_pretrained(tiny_base()[0], tok, edit_dir)
    assert reloaded.edit.edits == edited.edit.edits and reloaded.edit.key_edit == edited.edit.key_edit
    assert [e["case_id"] for e in reloaded.edit.edits] == [r["case_id"] for r in EDITS]
    assert len(reloaded.edit.key_edit) == len(reloaded.edit.familiarity.keys)
    old = MeGModel(tiny_base()[0], tok, reloaded.edit)
    old.edit.edits = None  # as an edit saved before edits.json existed
    t = trace_query(old, EDITS[0]["prompt"])
    assert t["nearest_edits"] == [] and "nearest edits: unknown" in format_trace(t)


def test_megedit_ask_command(saved, capsys):
    edited, _, edit_dir, base_dir = saved
    question = EDITS[2]["prompt"]
    assert main(["ask", str(edit_dir), question, UNRELATED[0], "--model", str(base_dir), "--json", "--k", "1"]) == 0
    traces = json.loads(capsys.readouterr().out)
    assert [t["question"] for t in traces] == [question, UNRELATED[0]]
    assert traces[0] == json.loads(json.dumps(trace_query(edited, question, k=1)))  # the same as the Python call
    assert main(["ask", str(edit_dir), question, "--model", str(base_dir)]) == 0
    assert "decision:" in capsys.readouterr().out
    for argv, message in (([str(edit_dir.parent / "nowhere"), "q"], "cannot load a megedit edit"),
                          ([str(edit_dir), " "], "every question must be non-empty")):
        assert main(["ask", *argv, "--model", str(base_dir)]) == 2
        assert message in capsys.readouterr().err


def test_gate_probe_reports_each_kind(saved):
    """The probe's rates per locality kind (where there are several) and per portability kind, on the real gate."""
    from megedit.probe import familiar_rate, gate_probe

    edited = saved[0]
    requests = [{**EDITS[0], "locality": {
        "Relation_Specificity": {"prompt": ["Danielle Darrieux was born in", UNRELATED[0]], "ground_truth": [["Paris"],
                                                                                                            ["cold"]]},
        "Forgetfulness": {"prompt": [UNRELATED[1]], "ground_truth": [["France"]]}},
        "portability": {"Subject_Aliasing": {"prompt": [EDITS[0]["prompt"]], "ground_truth": [["English"]]}}}]
    probe = gate_probe(edited.edit, requests, None)
    rates, n = probe["familiar_rate"], probe["n"]
    assert n == {"edit_prompt": 1, "rephrase": 1, "locality": 3, "locality.Relation_Specificity": 2,
                 "locality.Forgetfulness": 1, "portability.Subject_Aliasing": 1}
    assert rates["locality.Relation_Specificity"] == familiar_rate(
        edited.edit, ["Danielle Darrieux was born in", UNRELATED[0]])
    assert rates["portability.Subject_Aliasing"] == rates["edit_prompt"]  # the same text
