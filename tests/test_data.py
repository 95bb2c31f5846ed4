"""Data loaders on the real benchmark files (EasyEdit request dicts), path resolution, and request validation."""
import json
import os
from pathlib import Path

import pytest
from conftest import missing_asset

from megedit.data import detect_format, load_requests, resolve_data_path, validate_requests

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality", "portability"}


def data_dir() -> Path:
    for candidate in (os.environ.get("MEGEDIT_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "counterfact" / "counterfact-edit.json").exists():
            return Path(candidate)
    missing_asset("real benchmark data not found: set $MEGEDIT_DATA or put it at ../shared/data beside the repo")


@pytest.fixture(scope="module")
def data():
    return data_dir()


def check_request(r: dict):
    assert set(r) == KEYS
    for key in ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt"):
        assert isinstance(r[key], str) and r[key].strip(), key
    assert r["subject"] in r["prompt"]
    loc = r["locality"]["neighborhood"]
    assert isinstance(loc["prompt"], str) and loc["prompt"] and isinstance(loc["ground_truth"], str)


def test_counterfact(data):
    raw = json.loads((data / "counterfact/counterfact-edit.json").read_text())[:3]
    reqs = load_requests("counterfact", data / "counterfact/counterfact-edit.json", n=3)
    assert len(reqs) == 3
    for r, rec in zip(reqs, raw):
        check_request(r)
        assert (r["case_id"], r["prompt"], r["subject"], r["target_new"], r["ground_truth"], r["rephrase_prompt"]) == (
            rec["case_id"], rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"], rec["rephrase_prompt"])
        assert r["locality"] == {"neighborhood": {"prompt": rec["locality_prompt"],
                                                  "ground_truth": rec["locality_ground_truth"]}}
    assert reqs[0]["prompt"] == "The mother tongue of Danielle Darrieux is" and reqs[0]["target_new"] == "English"


def test_counterfact_rome(data):
    raw = json.loads((data / "counterfact_rome/counterfact_500.json").read_text())[:3]
    reqs = load_requests("counterfact-rome", data / "counterfact_rome/counterfact_500.json", n=3)
    for r, rec in zip(reqs, raw):
        check_request(r)
        rw = rec["requested_rewrite"]
        assert "{}" not in r["prompt"] and r["prompt"] == rw["prompt"].replace("{}", rw["subject"])
        assert r["target_new"] == rw["target_new"]["str"] and r["ground_truth"] == rw["target_true"]["str"]
        assert r["rephrase_prompt"] == rec["paraphrase_prompts"][0]
        # ROME's neighbourhood prompts share the true object: their answer is target_true
        assert r["locality"]["neighborhood"] == {"prompt": rec["neighborhood_prompts"][0],
                                                 "ground_truth": rw["target_true"]["str"]}
        assert r["case_id"] == rec["case_id"]


def test_zsre(data):
    raw = json.loads((data / "zsre/zsre_mend_edit_portability.json").read_text())[:3]
    reqs = load_requests("zsre", data / "zsre/zsre_mend_edit_portability.json", n=3)
    for i, (r, rec) in enumerate(zip(reqs, raw)):
        check_request(r)
        assert (r["prompt"], r["target_new"], r["ground_truth"], r["rephrase_prompt"]) == (
            rec["src"], rec["alt"], rec["answers"][0], rec["rephrase"])
        assert r["locality"]["neighborhood"] == {"prompt": rec["loc"], "ground_truth": rec["loc_ans"]}
        assert r["portability"] == {"one_hop": {"prompt": rec["portability"]["New Question"],
                                                "ground_truth": rec["portability"]["New Answer"]}}
        assert r["case_id"] == i


@pytest.mark.parametrize("path, fmt", [("counterfact/counterfact-train.json", "counterfact"),
                                       ("counterfact_rome/counterfact_500.json", "counterfact-rome"),
                                       ("zsre/zsre_mend_train-1k.json", "zsre")])
def test_auto_detection(data, path, fmt):
    assert detect_format(json.loads((data / path).read_text())[0]) == fmt
    assert load_requests("auto", data / path, n=2, offset=5) == load_requests(fmt, data / path, n=2, offset=5)


def test_offset_and_case_ids(data):
    path = data / "zsre/zsre_mend_train-1k.json"
    all5 = load_requests("zsre", path, n=5)
    assert load_requests("zsre", path, n=2, offset=3) == all5[3:5]
    assert [r["case_id"] for r in all5] == list(range(5))


def test_relative_path_is_resolved_under_megedit_data(data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the relative path does not exist from here
    monkeypatch.setenv("MEGEDIT_DATA", str(data))
    assert resolve_data_path("counterfact/counterfact-val.json") == data / "counterfact/counterfact-val.json"
    reqs = load_requests("auto", "counterfact/counterfact-val.json", n=1)
    assert reqs == load_requests("auto", data / "counterfact/counterfact-val.json", n=1)


def test_existing_path_wins_over_megedit_data(data, monkeypatch, tmp_path):
    (tmp_path / "counterfact").mkdir()
    local = tmp_path / "counterfact" / "counterfact-val.json"
    local.write_text(json.dumps([{"prompt": "A B is", "subject": "A B", "target_new": "x"}]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEGEDIT_DATA", str(data))
    assert resolve_data_path("counterfact/counterfact-val.json") == Path("counterfact/counterfact-val.json")
    assert load_requests("auto", "counterfact/counterfact-val.json")[0]["target_new"] == "x"


def test_missing_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEGEDIT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"'nope\.json' does not exist.*MEGEDIT_DATA, which is unset"):
        load_requests("auto", "nope.json")
    monkeypatch.setenv("MEGEDIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'nope\.json' does not exist$"):
        load_requests("auto", "nope.json")


def test_unknown_format_name(data):
    with pytest.raises(ValueError, match=r"unknown data format 'mquake'; choose one of"):
        load_requests("mquake", data / "counterfact/counterfact-val.json")


def test_unrecognised_records(data):
    path = data / "unke" / "UnKEBench-dev.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with pytest.raises(ValueError, match=r"unknown data format \(record keys \['answer', 'id'"):
        load_requests("auto", path, n=1)


def test_mquake_is_rejected_as_an_unknown_format(data):
    path = data / "mquake" / "MQuAKE-hard-dev.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with pytest.raises(ValueError, match="format"):
        load_requests("auto", path, n=1)


@pytest.mark.parametrize("fmt, actual", [("zsre", "counterfact"), ("counterfact-rome", "counterfact")])
def test_wrong_explicit_format(data, fmt, actual):
    with pytest.raises(ValueError, match=f"looks like '{actual}' data, not '{fmt}'"):
        load_requests(fmt, data / "counterfact/counterfact-val.json", n=1)


def test_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "x",')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_requests("auto", path)


@pytest.mark.parametrize("payload", ["[]", '{"prompt": "x"}'])
def test_not_a_list_of_records(tmp_path, payload):
    path = tmp_path / "d.json"
    path.write_text(payload)
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_requests("auto", path)


def test_n_larger_than_the_file(data):
    with pytest.raises(ValueError, match=r"has 500 records; asked for 501 from offset 0"):
        load_requests("auto", data / "counterfact_rome/counterfact_500.json", n=501)
    with pytest.raises(ValueError, match=r"has 500 records; asked for 5 from offset 498"):
        load_requests("auto", data / "counterfact_rome/counterfact_500.json", n=5, offset=498)
    with pytest.raises(ValueError, match="n must be positive"):
        load_requests("auto", data / "counterfact_rome/counterfact_500.json", n=0)


# ---------------------------------------------------------------- validate_requests

def req(**kw):
    return {"case_id": kw.pop("case_id", 7), "prompt": "The capital of France is", "subject": "France",
            "target_new": "Rome", **kw}


def test_valid_requests_pass_through():
    reqs = [req(), req(prompt="Toko Yasuda plays the", subject="Toko Yasuda", target_new="piano")]
    assert validate_requests(reqs) == reqs
    assert validate_requests(iter(reqs)) == reqs
    assert validate_requests(reqs[0]) == [reqs[0]]  # a single dict, as EasyEdit allows
    assert validate_requests([req(), req()]) == [req(), req()]  # exact duplicates do not conflict


def test_empty_request_list():
    with pytest.raises(ValueError, match="the request list is empty"):
        validate_requests([])


@pytest.mark.parametrize("key", ["prompt", "target_new"])
def test_missing_prompt_or_target(key):
    r = req()
    del r[key]
    with pytest.raises(ValueError, match=rf"request 1 \(case_id 7\) has no '{key}'"):
        validate_requests([req(case_id=1), r])


@pytest.mark.parametrize("value", ["   ", "", None, 3])
def test_blank_or_non_string_target(value):
    with pytest.raises(ValueError, match=r"request 0 \(case_id 7\): 'target_new' must be a non-empty string"):
        validate_requests([req(target_new=value)])


def test_subject_not_in_prompt():
    with pytest.raises(ValueError, match=r"subject 'Spain' is not a substring of prompt 'The capital of France is'"):
        validate_requests([req(subject="Spain")])


def test_subject_needed():
    validate_requests([req(subject=None)])
    with pytest.raises(ValueError, match="has no 'subject'"):
        validate_requests([req(subject=None)], need_subject=True)


def test_conflicting_duplicate_targets():
    with pytest.raises(ValueError, match=r"request 2 \(case_id 9\): prompt 'The capital of France is' is edited twice "
                                         r"with conflicting targets 'Rome' \(case_id 7\) and 'Berlin' \(case_id 9\); "
                                         r"drop one of them \(megedit.data.drop_conflicts, `megedit edit "
                                         r"--drop-conflicts` or a run config's data.drop_conflicts keep the first\)$"):
        validate_requests([req(), req(prompt="Paris is in", subject="Paris"), req(case_id=9, target_new="Berlin")])


def test_drop_conflicts_keeps_each_prompts_first_edit():
    from megedit.data import drop_conflicts

    reqs = [req(), req(prompt="Paris is in", subject="Paris"), req(case_id=9, target_new="Berlin"), req(case_id=10),
            req(case_id=11, target_new="Oslo")]
    kept, dropped = drop_conflicts(reqs)
    assert kept == [reqs[0], reqs[1], reqs[3]]  # an exact repeat of the first edit is no conflict
    assert dropped == [2, 4]
    assert validate_requests(kept) == kept
    assert drop_conflicts(reqs[:2]) == (reqs[:2], [])


def test_non_dict_request():
    with pytest.raises(ValueError, match="request 0 is a str"):
        validate_requests(["The capital of France is"])
