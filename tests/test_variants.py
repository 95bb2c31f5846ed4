"""bench/variants.py: which stages a variant trained, and its table of kept variant results."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from variants import table, trained  # noqa: E402

SUMMARY = {"rel_tf": 99.0, "rel_ag": 98.0, "gen_tf": 90.0, "gen_ag": 89.0, "loc_tf": 97.0, "loc_ag": 96.0,
           "score": 94.8}


def test_trained_stages_are_the_folders_a_variant_added():
    before = {"stage1_encoder-a", "embed-b", "stage2_familiarity-c", "stage3_neurons-d", "stage4_generator-e"}
    after = before | {"stage4_generator-f", "stage3_neurons-g"}
    assert trained(before, after) == ["stage3_neurons", "stage4_generator"]  # stage order, not name order
    assert trained(before, before) == []


def test_table_has_a_row_per_variant_and_says_what_failed(tmp_path):
    report = {"fit": {"mean_steps": 0.75}, "generator": {"steps": 640},
              "gate": {"familiar_pass": 0.95, "near_miss_blocked": {"same_subject": 0.9}}}
    ok = {"variant": "fast", "settings": "gen_epochs=20", "post": SUMMARY, "report": report,
          "seconds": {"stage4_generator": 390.0}, "trained_stages": ["stage4_generator"]}
    failed = {"variant": "diverged", "settings": "gen_lr=1", "error": "generator training diverged: loss nan"}
    for record in (ok, failed):
        (tmp_path / record["variant"]).mkdir()
        (tmp_path / record["variant"] / "results.json").write_text(json.dumps(record))
    lines = table(tmp_path).splitlines()
    assert len(lines) == 4 and all(line.startswith("|") for line in lines)
    fast = next(line for line in lines if line.startswith("| fast"))
    assert "`gen_epochs=20`" in fast and "| 94.8 |" in fast and "| 0.8 | 640 |" in fast and "| 390 |" in fast
    assert "stage4_generator" in fast
    assert "failed: generator training diverged" in next(line for line in lines if line.startswith("| diverged"))


def test_knowedit_kinds_get_columns_only_where_the_data_has_them(tmp_path):
    report = {"fit": {"mean_steps": 1.0}, "generator": {"steps": 600}, "gate": {}}
    knowedit = {**{k: v for k, v in SUMMARY.items() if not k.startswith("gen")},
                "loc_tf.Relation_Specificity": 71.5, "loc_ag.Relation_Specificity": 40.0}
    record = {"variant": "ke", "settings": "", "post": knowedit, "report": report, "seconds": {}, "trained_stages": []}
    (tmp_path / "ke").mkdir()
    (tmp_path / "ke" / "results.json").write_text(json.dumps(record))
    header, _, row = table(tmp_path).splitlines()
    assert "loc_tf.Relation_Specificity" in header and "port_ag.Subject_Aliasing" not in header
    assert "| 71.5 | 40.0 |" in row and "| nan | nan |" in row  # no Generality on KnowEdit
    (tmp_path / "ke").rename(tmp_path / "cf")
    cf = {**record, "variant": "cf", "post": SUMMARY}
    (tmp_path / "cf" / "results.json").write_text(json.dumps(cf))
    assert "Relation_Specificity" not in table(tmp_path)


def test_a_bad_eval_n_fails_before_the_model_loads(tmp_path, monkeypatch):
    import pytest
    import variants
    from conftest import write_counterfact_edits

    data = write_counterfact_edits(tmp_path / "edits.json")
    monkeypatch.setattr(variants, "load_model", lambda hp: pytest.fail("the model loaded before --eval-n was checked"))
    with pytest.raises(ValueError, match="--eval-n must be between 1 and the number of edits"):
        variants.main(["hparams/MeG/smollm2-135m.yaml", "--data", str(data), "--n", "2", "--eval-n", "5",
                       "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ck"), "base", ""])
