"""Locality and portability per kind (KnowEdit's Relation_Specificity, ..., CounterFact's neighborhood), TF and AG, in
the summary, the CLI table and `megedit run`'s tables; the Score without rephrase prompts."""
import csv
import math

import pytest

from megedit import report
from megedit.cli_edit import format_table
from megedit.data import load_requests
from megedit.evaluate import evaluate_requests, greedy, kind_metrics, locality_reference, score

from conftest import tiny_model
from test_data import data_dir
from test_evaluate import by_hand

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def knowedit():
    """Real KnowEdit records holding every locality and portability kind between them."""
    requests = load_requests("knowedit", data_dir() / "knowedit/wiki_counterfact_train_cf.json", n=40)
    picked, kinds = [], set()
    for r in requests:
        new = {f"l.{k}" for k in r["locality"]} | {f"p.{k}" for k in r["portability"]}
        if new - kinds:
            picked.append(r)
            kinds |= new
    assert len(kinds) == 5
    return picked


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_each_kind_is_scored_on_its_own(knowedit, llama, gpt2_tokenizer):
    tok = gpt2_tokenizer
    ref = locality_reference(llama, tok, knowedit, batch_size=4)
    same = evaluate_requests(llama, tok, knowedit, ref, batch_size=4, progress=False)
    s = same["summary"]
    for kind in ("Relation_Specificity", "Forgetfulness"):
        assert s[f"loc_tf.{kind}"] == 100.0 and s[f"loc_ag.{kind}"] == 100.0  # the unedited model itself
    assert kind_metrics(s) == [
        "loc_tf.Forgetfulness", "loc_ag.Forgetfulness", "loc_tf.Relation_Specificity", "loc_ag.Relation_Specificity",
        "port_tf.Logical_Generalization", "port_ag.Logical_Generalization", "port_tf.Reasoning", "port_ag.Reasoning",
        "port_tf.Subject_Aliasing", "port_ag.Subject_Aliasing"]
    # no rephrase prompts: the Score is that of the four Rel and Loc numbers, not NaN
    assert "gen_tf" not in s and not math.isnan(s["score"])
    assert s["score"] == score({k: s[k] for k in ("rel_tf", "rel_ag", "loc_tf", "loc_ag")})

    other = evaluate_requests(tiny_model("llama", seed=1), tok, knowedit, ref, batch_size=4, progress=False)
    for i, (r, per) in enumerate(zip(knowedit, other["per_request"])):
        for kind, entry in r["locality"].items():  # each kind alone equals the request evaluated with that kind only
            alone = [{**r, "locality": {kind: entry}, "portability": {}}]
            one = evaluate_requests(tiny_model("llama", seed=1), tok, alone, locality_reference(llama, tok, alone),
                                    progress=False)["per_request"][0]
            assert per[f"loc_tf.{kind}"] == one["loc_tf"] and per[f"loc_ag.{kind}"] == one["loc_ag"]
        for kind, entry in r["portability"].items():  # TF by hand on the first alias of each item
            hand = [by_hand(llama, tok, p, a[0]) for p, a in zip(entry["prompt"], entry["ground_truth"])]
            tf = sum(sum(x == y for x, y in zip(pred, gold)) / len(gold) for pred, gold in hand) / len(hand)
            assert same["per_request"][i][f"port_tf.{kind}"] == pytest.approx(tf)
    assert other["summary"]["loc_tf.Relation_Specificity"] < 100.0


def test_portability_ag_accepts_any_alias(llama, gpt2_tokenizer):
    tok = gpt2_tokenizer
    prompt = "The name of the country which Gorsedd of Brittany is associated with is"
    said = tok.decode(greedy(llama, tok, [prompt], [3])[0])  # what the model answers, as text
    request = {"prompt": "The name of the country which Goursez Vreizh is associated with is", "target_new": "France",
               "portability": {"Subject_Aliasing": {"prompt": [prompt], "ground_truth": [["Wales"]]}}}
    wrong = evaluate_requests(llama, tok, [request], None, progress=False)["per_request"][0]
    assert wrong["port_ag.Subject_Aliasing"] == 0.0
    request["portability"]["Subject_Aliasing"]["ground_truth"] = [["Wales", said.strip()]]
    right = evaluate_requests(llama, tok, [request], None, progress=False)["per_request"][0]
    assert right["port_ag.Subject_Aliasing"] == 1.0  # the second alias is what it generates
    assert right["port_tf.Subject_Aliasing"] == wrong["port_tf.Subject_Aliasing"]  # TF: the first alias only


def test_counterfact_score_is_unchanged():
    six = {"rel_tf": 100.0, "rel_ag": 90.0, "gen_tf": 80.0, "gen_ag": 70.0, "loc_tf": 60.0, "loc_ag": 50.0}
    assert score({**six, "loc_tf.neighborhood": 1.0}) == pytest.approx(6 / sum(1 / v for v in six.values()))
    assert math.isnan(score({k: v for k, v in six.items() if k != "gen_ag"}))  # one of the two missing: not defined
    four = {k: v for k, v in six.items() if not k.startswith("gen")}
    assert score(four) == pytest.approx(4 / sum(1 / v for v in four.values()))


def test_tables_show_every_kind(tmp_path):
    summary = {"rel_tf": 99.0, "rel_ag": 96.0, "loc_tf": 70.0, "loc_ag": 40.0, "score": 66.0,
               "loc_tf.Relation_Specificity": 65.5, "loc_ag.Relation_Specificity": 36.0,
               "port_tf.Subject_Aliasing": 80.0, "port_ag.Subject_Aliasing": 50.0}
    table = format_table(summary, summary)
    assert "\nloc_ag.Relation_Specificity    36.0    36.0\n" in table and "\nport_tf.Subject_Aliasing" in table
    records = [{"method": m, "n": 2, "summary": dict(summary), "easyedit": {
        "post_rewrite_acc": 1.0, "post_rephrase_acc": math.nan, "post_locality_acc": 1.0}, "edit_seconds": 1.0,
        "peak_rss_gb": 1.0} for m in ("MeG", "MEMIT")]
    del records[1]["summary"]["port_ag.Subject_Aliasing"]
    rows = [report.result_row(r, ["rel_tf", "loc_tf", "score"]) for r in records]
    report.write_tables(tmp_path, "kinds", rows, records)
    md = (tmp_path / "results.md").read_text()
    assert "## Locality and portability per kind" in md
    assert "| method | n | Loc Relation_Specificity TF | Loc Relation_Specificity AG | Port Subject_Aliasing TF |" in md
    assert "| MeG | 2 | 65.5 | 36.0 | 80.0 | 50.0 |" in md and "| MEMIT | 2 | 65.5 | 36.0 | 80.0 | nan |" in md
    (row,) = [r for r in csv.DictReader(open(tmp_path / "results.csv")) if r["method"] == "MeG"]
    assert row["loc_ag.Relation_Specificity"] == "36.0" and row["rel_tf"] == "99.0"
    plain = [{**r, "summary": {k: v for k, v in summary.items() if "." not in k}} for r in records]
    report.write_tables(tmp_path, "plain", rows, plain)
    assert "per kind" not in (tmp_path / "results.md").read_text()
