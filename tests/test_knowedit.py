"""KnowEdit records as EasyEdit request dicts (every kind under its own name, alias lists) and the fixed split."""
import json

import pytest
import yaml

from megedit import runner
from megedit.data import detect_format, load_requests, validate_requests
from megedit.knowedit import LOCALITY_KINDS, PORTABILITY_KINDS, aliases, first_item, split_of

from test_data import data_dir

FILE = "knowedit/wiki_counterfact_train_cf.json"


@pytest.fixture(scope="module")
def raw():
    return json.loads((data_dir() / FILE).read_text())


@pytest.fixture(scope="module")
def requests():
    return load_requests("knowedit", data_dir() / FILE)


def test_every_record_and_kind_is_kept(raw, requests):
    assert len(requests) == len(raw) == 1427 and detect_format(raw[0]) == "knowedit"
    for group, kinds in (("locality", LOCALITY_KINDS), ("portability", PORTABILITY_KINDS)):
        for kind in kinds:  # every kind, under its own name, with every item of every record
            items_raw = sum(len(rec[group].get(kind, [])) for rec in raw)
            items = sum(len(r[group][kind]["prompt"]) for r in requests if kind in r[group])
            assert items == items_raw > 0, (group, kind)
            assert sum(kind in r[group] for r in requests) == sum(kind in rec[group] for rec in raw)
    counts = {k: sum(k in r["locality"] for r in requests) for k in LOCALITY_KINDS}
    assert counts == {"Relation_Specificity": 1253, "Forgetfulness": 781}  # as the data README says
    assert all(r["rephrase_prompt"] is None for r in requests)  # KnowEdit has none: still valid requests
    assert validate_requests(requests, need_subject=True) == requests
    first, rec = requests[0], raw[0]
    assert (first["case_id"], first["prompt"], first["subject"], first["target_new"], first["ground_truth"]) == \
        (0, rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"])
    rs = rec["locality"]["Relation_Specificity"][0]
    assert first["locality"]["Relation_Specificity"] == {"prompt": [rs["prompt"]], "ground_truth": [[rs["ground_truth"]]]}
    two = next(i for i, rec in enumerate(raw) if len(rec["portability"].get("Reasoning", [])) == 2)
    reasoning = requests[two]["portability"]["Reasoning"]
    assert reasoning["prompt"] == [item["prompt"] for item in raw[two]["portability"]["Reasoning"]]
    assert reasoning["ground_truth"] == [[item["ground_truth"]] for item in raw[two]["portability"]["Reasoning"]]


def test_alias_lists(raw, tmp_path):
    """Other KnowEdit files give answers as (nested) alias lists: kept as flat alias lists, the first one EasyEdit's."""
    rec = json.loads(json.dumps(raw[0]))
    rec["ground_truth"] = ["France", "French Republic"]
    rec["portability"]["Subject_Aliasing"][0]["ground_truth"] = [["Franche-Comté", "Franche-Comte"]]
    rec["locality"]["Relation_Specificity"].append({"prompt": "", "ground_truth": "dropped: no prompt"})
    rec["locality"]["Forgetfulness"] = [{"prompt": "The founder of Goursez Vreizh was", "ground_truth": ["  "]}]
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps([rec]))
    (r,) = load_requests("auto", path)
    assert r["ground_truth"] == "France" and r["ground_truth_aliases"] == ["France", "French Republic"]
    assert r["portability"]["Subject_Aliasing"]["ground_truth"] == [["Franche-Comté", "Franche-Comte"]]
    assert len(r["locality"]["Relation_Specificity"]["prompt"]) == 1  # the item with no prompt is left out
    assert "Forgetfulness" not in r["locality"]  # its only item has an empty answer
    assert aliases([["a", ["b"]], " ", None, "c "]) == ["a", "b", "c"]
    assert first_item(r["portability"]["Subject_Aliasing"])["ground_truth"] == "Franche-Comté"
    plain = {"prompt": "The capital of Spain is", "ground_truth": "Madrid"}
    assert first_item(plain) is plain  # CounterFact's entries pass unchanged


def test_bad_kind_shape_is_a_clear_error(raw, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{**raw[0], "locality": {"Relation_Specificity": "The gender of X is"}}]))
    with pytest.raises(ValueError, match=r"record 0: locality.Relation_Specificity must be a list"):
        load_requests("knowedit", path)


def test_split_is_fixed_disjoint_and_counted_within_its_part(requests):
    val = load_requests("knowedit", data_dir() / FILE, split="validation")
    rep = load_requests("knowedit", data_dir() / FILE, split="reported")
    ids_val, ids_rep = [r["case_id"] for r in val], [r["case_id"] for r in rep]
    assert (len(val), len(rep)) == (432, 995) and not set(ids_val) & set(ids_rep)
    assert sorted(ids_val + ids_rep) == list(range(len(requests)))  # case ids stay file positions
    assert ids_val[:5] == [1, 4, 6, 12, 14] and all(split_of(i) == "validation" for i in ids_val)
    some = load_requests("knowedit", data_dir() / FILE, n=3, offset=2, split="validation")
    assert [r["case_id"] for r in some] == ids_val[2:5] and some[0] == requests[ids_val[2]]
    with pytest.raises(ValueError, match=r"432 in its validation part.*asked for 500"):
        load_requests("knowedit", data_dir() / FILE, n=500, split="validation")
    with pytest.raises(ValueError, match=r"unknown split 'test'"):
        load_requests("knowedit", data_dir() / FILE, split="test")


def test_run_config_takes_format_and_split(tmp_path):
    hp = tmp_path / "meg.yaml"
    hp.write_text("alg_name: MeG\n")
    path = tmp_path / "run.yaml"
    for split, ok in (("validation", True), ("dev", False)):
        path.write_text(yaml.safe_dump({"data": {"format": "knowedit", "path": FILE, "split": split}, "sizes": [10],
                                        "methods": [str(hp)]}))
        if ok:
            cfg = runner.load_config(path)
            assert (cfg.data_format, cfg.split) == ("knowedit", "validation")
            plain = runner.load_config(path)
            plain.split = None
            assert runner.fingerprint(cfg, cfg.methods[0], 10) != runner.fingerprint(plain, cfg.methods[0], 10)
        else:
            with pytest.raises(ValueError, match=r"data.split must be one of \['validation', 'reported'\]"):
                runner.load_config(path)


def test_easyedit_gets_plain_strings(requests):
    """BaseEditor.batch_edit's own locality number gets each request's first locality item as strings."""
    inputs = runner.batch_edit_inputs(requests[:4])
    assert all(isinstance(p, str) for p in inputs["locality_prompts"])
    assert all(isinstance(a, str) for a in inputs["locality_ground_truth"])
    assert inputs["rephrase_prompts"] is None
    assert inputs["locality_prompts"][0] == requests[0]["locality"]["Relation_Specificity"]["prompt"][0]


def test_megedit_edit_on_a_knowedit_split(tmp_path, capsys):
    """`megedit edit --format knowedit --split reported` on a tiny llama: the first records of that part are edited,
    each kind is in the table and results.json, and a KnowEdit file's locality prompts can be probe questions."""
    from megedit.cli import main
    from test_cli import tiny_model_dir, tiny_yaml
    from tiny_meg import EDITS

    data = tmp_path / "knowedit.json"  # tiny_meg's single-token edits (a tiny model can learn them) as KnowEdit
    data.write_text(json.dumps([{
        "subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"], "ground_truth": ["x", "y"],
        "locality": {"Relation_Specificity": [{"prompt": f"The gender of {r['subject']} is", "ground_truth": "male"}]},
        "portability": {"Subject_Aliasing": [{"prompt": r["prompt"].replace(r["subject"], r["subject"].upper()),
                                              "ground_truth": [[r["target_new"]]]}]}} for r in EDITS]))
    assert [split_of(i) for i in range(4)] == ["reported", "validation", "reported", "reported"]
    model_dir = tiny_model_dir(tmp_path)
    rc = main(["edit", str(tiny_yaml(tmp_path, model_dir)), "--data", str(data), "--format", "knowedit",
               "--split", "reported", "--n", "2", "--probe-questions", str(data),
               "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["split"] == "reported" and results["evaluated_case_ids"] == [0, 2]
    kinds = ("loc_tf.Relation_Specificity", "loc_ag.Relation_Specificity", "port_tf.Subject_Aliasing",
             "port_ag.Subject_Aliasing")
    assert all(k in results["post"] and k in results["pre"] and f"\n{k} " in out for k in kinds)
    assert results["pre"]["loc_tf.Relation_Specificity"] == 100.0 and "gen_tf" not in results["post"]
    assert "(reported part)" in out
    assert results["report"]["gate_probe"]["n"]["questions"] == len(EDITS)  # one Relation_Specificity prompt each


def test_bench_pool_adds_the_other_part_only(tmp_path, monkeypatch):
    """bench/knowedit_pool.py: CounterFact's train split plus the reported part's prompts and same-subject prompts,
    nothing about a validation record's subject, readable as a pseudo-edit pool."""
    from pathlib import Path

    from megedit.augment import PseudoEditPool

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import knowedit_pool

    out = tmp_path / "pool.json"
    assert knowedit_pool.main(["--counterfact", str(data_dir() / "counterfact/counterfact-train.json"),
                               "--knowedit", str(data_dir() / FILE), "--part", "reported", "--out", str(out)]) == 0
    pool = load_requests("auto", out)
    added = [r for r in pool if str(r["case_id"]).startswith("knowedit-")]
    reported = load_requests("knowedit", data_dir() / FILE, split="reported")
    validation = load_requests("knowedit", data_dir() / FILE, split="validation")
    n_same = sum(len(r["locality"].get("Relation_Specificity", {"prompt": []})["prompt"]) for r in reported)
    assert len(pool) - len(added) == 10000 and len(reported) < len(added) <= len(reported) + n_same
    only_validation = {r["subject"] for r in validation} - {r["subject"] for r in reported}
    assert only_validation and not only_validation & {r["subject"] for r in added}
    assert "The gender of {} is" in PseudoEditPool(pool).by_template  # KnowEdit's most common same-subject relation
