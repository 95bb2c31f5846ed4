"""`megedit run` on KnowEdit data: MeG, MEMIT and AlphaEdit each get locality and portability per kind in
results.json, results.csv and results.md."""
import csv
import json

import pytest
import yaml

from megedit import runner
from conftest import REQUESTS, three_methods

pytestmark = pytest.mark.usefixtures("single_thread", "easyedit")

SAME_SUBJECT = ["The currency of France is", "Toko Yasuda was born in", "Michel Denisot works as a"]


def knowedit_records() -> list[dict]:
    """The conftest requests in KnowEdit's format: same-subject locality, a subject alias, no rephrase."""
    return [{"subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"],
             "ground_truth": [r["ground_truth"]],
             "locality": {"Relation_Specificity": [{"prompt": same, "ground_truth": "euro"}],
                          "Forgetfulness": [{"prompt": r["locality"]["neighborhood"]["prompt"],
                                             "ground_truth": r["locality"]["neighborhood"]["ground_truth"]}]},
             "portability": {"Subject_Aliasing": [{"prompt": r["rephrase_prompt"], "ground_truth": r["target_new"]}]}}
            for r, same in zip(REQUESTS, SAME_SUBJECT)]


def test_every_method_reports_each_kind(tmp_path):
    meg, memit, alpha = three_methods(tmp_path)
    data = tmp_path / "knowedit.json"
    data.write_text(json.dumps(knowedit_records()))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"format": "knowedit", "path": str(data)}, "sizes": [2],
                                    "methods": [str(meg), str(memit), str(alpha)], "output": str(tmp_path / "out"),
                                    "isolate": False}))
    cfg = runner.load_config(path)
    records = runner.run(cfg, progress=False)
    assert {r["alg_name"] for r in records} == {"MeG", "MEMIT", "AlphaEdit"}
    kinds = {"loc_tf.Relation_Specificity", "loc_ag.Relation_Specificity", "loc_tf.Forgetfulness",
             "loc_ag.Forgetfulness", "port_tf.Subject_Aliasing", "port_ag.Subject_Aliasing"}
    for r in records:
        assert kinds <= set(r["summary"]) and "gen_tf" not in r["summary"]
        assert 0.0 <= r["summary"]["score"] <= 100.0  # no rephrase prompts: Rel and Loc make the Score
        assert r["summary"]["loc_tf"] == pytest.approx(
            (r["summary"]["loc_tf.Relation_Specificity"] + r["summary"]["loc_tf.Forgetfulness"]) / 2)  # one each
    saved = json.loads((cfg.output / "results.json").read_text())
    assert len(saved["kind_rows"]) == 3 and kinds <= set(saved["kind_rows"][0])
    rows = list(csv.DictReader(open(cfg.output / "results.csv")))
    assert len(rows) == 3 and kinds <= set(rows[0])
    table = (cfg.output / "results.md").read_text()
    assert "Loc Relation_Specificity TF" in table and "Port Subject_Aliasing AG" in table
    assert table.count("| 2 |") == 6  # three methods in each of the two tables
    # EasyEdit hands MeG one locality prompt per edit and no portability: MeG's training still knew every evaluation
    # text (what its checkpoint key hashes), as under `megedit edit`
    meg_record = next(r for r in records if r["alg_name"] == "MeG")
    run_json = next((cfg.output / "checkpoints").glob("*/run.json"))
    never = [set(r["never_train_on"]) for r in json.loads(run_json.read_text())["requests"]]
    for texts, record in zip(never, knowedit_records()):
        assert texts == {record["locality"]["Relation_Specificity"][0]["prompt"],
                         record["locality"]["Forgetfulness"][0]["prompt"],
                         record["portability"]["Subject_Aliasing"][0]["prompt"]}
    assert meg_record["meg_report"]["leakage"]["evaluation_texts"] == len(set().union(*never))
