"""``megedit`` CLI: help, and bad input rejected with one line and exit status 2 before any model is loaded."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import megedit
import megedit.loading
from megedit.cli import main

from test_data import data_dir

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = ROOT / "hparams" / "MeG" / "smollm2-135m.yaml"


def megedit_command() -> list[str]:
    exe = Path(sys.executable).parent / "megedit"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "megedit.cli"]


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Any attempt to load the LLM fails the test."""
    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(megedit, "load_model", tripwire)
    monkeypatch.setattr(megedit.loading, "load_model", tripwire)


def run_edit(capsys, *args) -> tuple[int, str, float]:
    start = time.perf_counter()
    rc = main(["edit", *map(str, args)])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    return rc, err, elapsed


def assert_one_line_error(rc, err, elapsed, *fragments):
    assert rc == 2
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith("megedit edit: error: ")
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert elapsed < 10


def bad_yaml(tmp_path, **extra) -> Path:
    config = yaml.safe_load(HPARAMS.read_text())
    path = tmp_path / "hp.yaml"
    path.write_text(yaml.safe_dump({**config, "model_name": str(tmp_path / "no-such-model"), **extra}))
    return path


def test_help():
    out = subprocess.run([*megedit_command(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "edit" in out.stdout and "usage: megedit" in out.stdout


def test_edit_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--data" in out and "--set" in out and "hparams" in out


def test_bad_hparams_key(tmp_path, capsys, no_model_loading):
    rc, err, elapsed = run_edit(capsys, bad_yaml(tmp_path, fit_stpes=3), "--data", "x.json")
    assert_one_line_error(rc, err, elapsed, "unknown key(s) 'fit_stpes' (did you mean 'fit_steps'?)", "hp.yaml")


def test_bad_hparams_key_from_the_console_script(tmp_path):
    """The real entry point, in a fresh process: exit 2 and one line, long before a model could load."""
    start = time.perf_counter()
    out = subprocess.run([*megedit_command(), "edit", str(bad_yaml(tmp_path, fit_stpes=3)), "--data", "x.json"],
                         capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "'fit_stpes' (did you mean 'fit_steps'?)" in out.stderr and out.stdout == ""
    assert elapsed < 60  # python + torch imports only (about 10 s on a busy 2-core machine)


def test_missing_data_file(tmp_path, capsys, no_model_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEGEDIT_DATA", str(tmp_path))
    rc, err, elapsed = run_edit(capsys, HPARAMS, "--data", "missing-edits.json", "--n", "3")
    assert_one_line_error(rc, err, elapsed, "data file 'missing-edits.json' does not exist")


def test_missing_pseudo_edit_data(tmp_path, capsys, no_model_loading, monkeypatch):
    monkeypatch.setenv("MEGEDIT_DATA", str(data_dir()))
    rc, err, elapsed = run_edit(capsys, HPARAMS, "--data", "counterfact/counterfact-val.json", "--n", "2",
                                "--pseudo-data", str(tmp_path / "no-pool.json"))
    assert_one_line_error(rc, err, elapsed, "no-pool.json", "does not exist")


@pytest.mark.parametrize("pair, fragment", [("fit_steps", "--set expects KEY=VALUE, got 'fit_steps'"),
                                            ("fit_steps=many", "field 'fit_steps' must be"),
                                            ("fit_stepz=3", "did you mean 'fit_steps'?")])
def test_bad_set(capsys, no_model_loading, pair, fragment):
    rc, err, elapsed = run_edit(capsys, HPARAMS, "--data", "x.json", "--set", pair)
    assert_one_line_error(rc, err, elapsed, fragment)


def test_bad_request_in_the_data(tmp_path, capsys, no_model_loading):
    data = tmp_path / "edits.json"
    data.write_text('[{"prompt": "The capital of France is", "subject": "Spain", "target_new": "Rome"}]')
    rc, err, elapsed = run_edit(capsys, HPARAMS, "--data", data, "--n", "1")
    assert_one_line_error(rc, err, elapsed, "subject 'Spain' is not a substring")


def test_malformed_yaml_is_one_line(tmp_path, capsys, no_model_loading):
    path = tmp_path / "broken.yaml"
    path.write_text("model_name: tiny\nlayer: [1, 2\n")
    rc, err, elapsed = run_edit(capsys, path, "--data", "x.json")
    assert_one_line_error(rc, err, elapsed, "broken.yaml is not valid YAML")


# ---------------------------------------------------------------- checks against the model's config, and --save

def edits_file(tmp_path) -> Path:
    from tiny_meg import EDITS

    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"case_id": r["case_id"], "prompt": r["prompt"], "subject": r["subject"],
                                 "target_new": r["target_new"], "ground_truth": "x", "rephrase_prompt": r["prompt"],
                                 "locality_prompt": "Paris is the capital of", "locality_ground_truth": "France"}
                                for r in EDITS]))
    return path


def tiny_model_dir(tmp_path) -> Path:
    from tiny_meg import tiny_base

    model, tok = tiny_base()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def tiny_yaml(tmp_path, model_name, **changes) -> Path:
    from tiny_meg import tiny_hparams

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_hparams(tmp_path, model_name=str(model_name), **changes).to_dict()))
    return path


def test_layer_out_of_range_is_caught_from_the_config(tmp_path, capsys, no_model_loading):
    from conftest import tiny_config

    tiny_config("llama", 50257).save_pretrained(tmp_path / "m")  # a config, no weights
    rc, err, elapsed = run_edit(capsys, tiny_yaml(tmp_path, tmp_path / "m", layer=5), "--data", edits_file(tmp_path), "--n", 4)
    assert_one_line_error(rc, err, elapsed, "hparams field 'layer' = 5 is out of range: this llama model has 3 "
                          "decoder layers; set layer to one of 0..2")


def test_unsupported_architecture_is_caught_from_the_config(tmp_path, capsys, no_model_loading):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=2).save_pretrained(tmp_path / "bert")
    rc, err, elapsed = run_edit(capsys, tiny_yaml(tmp_path, tmp_path / "bert"), "--data", edits_file(tmp_path), "--n", 4)
    assert_one_line_error(rc, err, elapsed, "model_type='bert'", "Add an ArchSpec to megedit.arch.ARCHS")


def test_model_folder_without_a_config(tmp_path, capsys, no_model_loading):
    (tmp_path / "empty").mkdir()
    rc, err, elapsed = run_edit(capsys, tiny_yaml(tmp_path, tmp_path / "empty"), "--data", edits_file(tmp_path), "--n", 4)
    assert_one_line_error(rc, err, elapsed, "hparams field 'model_name' =", "cannot read its config")


def test_save_into_a_folder_that_is_not_an_edit(tmp_path, capsys, no_model_loading):
    from conftest import tiny_config

    tiny_config("llama", 50257).save_pretrained(tmp_path / "m")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc, err, elapsed = run_edit(capsys, tiny_yaml(tmp_path, tmp_path / "m"), "--data", edits_file(tmp_path),
                                "--n", 4, "--save", tmp_path / "mine")
    assert_one_line_error(rc, err, elapsed, "mine exists and is not a saved megedit edit; choose a new or empty folder")


def test_edit_saves_the_edit_and_records_the_seed(tmp_path, capsys):
    """A whole ``megedit edit`` run on a tiny llama: --save writes an edit that loads onto the same model."""
    from megedit.loading import load_model
    from megedit.model import MeGModel

    model_dir = tiny_model_dir(tmp_path)
    rc = main(["edit", str(tiny_yaml(tmp_path, model_dir, seed=3)), "--data", str(edits_file(tmp_path)), "--n", "4",
               "--save", str(tmp_path / "edit"), "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["seed"] == 3 and results["hparams"]["seed"] == 3 and results["report"]["seed"] == 3
    assert results["saved_edit"] == str(tmp_path / "edit")
    # one process: its resident peak, at least the loaded model's weights
    peak = results["peak_memory"]
    assert peak["what"] == "resident" and peak["peak_gb"] == peak["rss_gb_per_rank"][0] > 0
    assert f"peak memory: {peak['peak_gb']:.2f} GB" in capsys.readouterr().out
    model, tok = load_model(str(model_dir))
    edited = MeGModel.from_pretrained(model, tok, tmp_path / "edit")
    assert edited.edit.hparams.seed == 3 and edited.edit.base_fingerprint["model_type"] == "llama"


@pytest.mark.parametrize("eval_n", [0, 5])
def test_eval_n_out_of_range_before_loading(tmp_path, capsys, no_model_loading, eval_n):
    from conftest import tiny_config

    tiny_config("llama", 50257).save_pretrained(tmp_path / "m")
    rc, err, elapsed = run_edit(capsys, tiny_yaml(tmp_path, tmp_path / "m"), "--data", edits_file(tmp_path),
                                "--n", 4, "--eval-n", eval_n)
    assert_one_line_error(rc, err, elapsed, "--eval-n must be between 1 and the number of edits (4)", str(eval_n))


def with_a_conflicting_edit(path: Path) -> Path:
    """The edits file plus a 5th record that edits the 2nd one's prompt to another target."""
    records = json.loads(path.read_text())
    records.append({**records[1], "case_id": 99, "target_new": "Judaism"})
    path.write_text(json.dumps(records))
    return path


def test_conflicting_edits_refused_before_loading_unless_dropped(tmp_path, capsys, no_model_loading):
    from conftest import tiny_config

    tiny_config("llama", 50257).save_pretrained(tmp_path / "m")
    data = with_a_conflicting_edit(edits_file(tmp_path))
    rc, err, elapsed = run_edit(capsys, tiny_yaml(tmp_path, tmp_path / "m"), "--data", data, "--n", 5)
    assert_one_line_error(rc, err, elapsed, "is edited twice with conflicting targets 'Islam' (case_id 11) and "
                          "'Judaism' (case_id 99); drop one of them")


def test_eval_n_edits_all_and_evaluates_a_seeded_sample(tmp_path, capsys):
    """--eval-n 2 of 4 (5 records, one dropped as conflicting): all four are edited (the fits), two drawn with the
    seed are scored, and the record says which, and which was dropped."""
    model_dir = tiny_model_dir(tmp_path)
    data = with_a_conflicting_edit(edits_file(tmp_path))
    rc = main(["edit", str(tiny_yaml(tmp_path, model_dir)), "--data", str(data), "--n", "5", "--drop-conflicts",
               "--eval-n", "2", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--drop-conflicts: left out 1 of 5 requests" in out and "case_ids [99]" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["dropped_conflicting_case_ids"] == [99]
    assert results["n"] == 4 and results["n_evaluated"] == 2 and len(results["per_request_post"]) == 2
    assert results["report"]["n_edits"] == 4  # trained on all four
    from megedit.cli_edit import evaluation_sample
    from tiny_meg import EDITS

    expected = [r["case_id"] for r in evaluation_sample(EDITS, 2, results["seed"])]
    assert results["evaluated_case_ids"] == expected and len(set(expected)) == 2
    assert "evaluated on 2 of them" in out
    assert results["report"]["gate_probe"]["n"]["edit_prompt"] == 2
