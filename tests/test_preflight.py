"""A user's mistake is one line and exit status 2, found before any model loads: paths the run will write, every
record of the data, --set values, the device, --offset, requests without a subject, and every method's final hparams
in ``megedit run``. Real bugs keep their traceback; Ctrl-C says whether the run resumes."""
import json
import os
from pathlib import Path

import pytest
import yaml

import megedit
from megedit import runner
from megedit.cli import main

from conftest import meg_hparams, memit_style_hparams, save_tiny_model, tiny_config
from test_cli import HPARAMS, assert_one_line_error, edits_file, no_model_loading, run_edit, tiny_yaml  # noqa: F401


@pytest.fixture()
def tiny(tmp_path):
    """A config-only llama folder (no weights: nothing may load them) and a tiny MeG hparams file for it."""
    tiny_config("llama", 50257).save_pretrained(tmp_path / "m")
    return tiny_yaml(tmp_path, tmp_path / "m")


def edit_args(tmp_path, hparams, *extra):
    return [hparams, "--data", edits_file(tmp_path), "--n", 4, "--out", tmp_path / "out", *extra]


def read_only_folder(tmp_path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits, not sysfs)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# ------------------------------------------------------------------------------------------ 1. paths, before work
def test_out_that_is_a_file(tmp_path, capsys, no_model_loading, tiny):
    (tmp_path / "out").write_text("not a folder")
    assert_one_line_error(*run_edit(capsys, *edit_args(tmp_path, tiny)), "--out", "is a file, not a folder")


def test_out_in_a_read_only_folder(tmp_path, capsys, no_model_loading, tiny):
    out = read_only_folder(tmp_path) / "results"
    args = edit_args(tmp_path, tiny)
    args[args.index(tmp_path / "out")] = out
    assert_one_line_error(*run_edit(capsys, *args), f"--out {out} cannot be written")
    assert not out.exists()


def test_earlier_results_are_not_overwritten_silently(tmp_path, capsys, no_model_loading, tiny):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    assert_one_line_error(*run_edit(capsys, *edit_args(tmp_path, tiny)), "already holds results.json",
                          "--overwrite")
    with pytest.raises(AssertionError, match="a model was loaded"):  # --overwrite: the checks pass, the model loads
        main(["edit", *map(str, edit_args(tmp_path, tiny, "--overwrite"))])


def test_checkpoint_dir_that_cannot_be_created(tmp_path, capsys, no_model_loading):
    (tmp_path / "ckpt").write_text("a file")
    hparams = tiny_yaml(tmp_path, tmp_path / "m", checkpoint_dir=str(tmp_path / "ckpt" / "run"))
    tiny_config("llama", 50257).save_pretrained(tmp_path / "m")
    assert_one_line_error(*run_edit(capsys, *edit_args(tmp_path, hparams)), "hparams field 'checkpoint_dir'",
                          "is a file, not a folder")


def test_save_under_a_file(tmp_path, capsys, no_model_loading, tiny):
    (tmp_path / "f").write_text("a file")
    assert_one_line_error(*run_edit(capsys, *edit_args(tmp_path, tiny, "--save", tmp_path / "f" / "edit")),
                          "--save's parent folder", "is a file, not a folder")


# ------------------------------------------------------------------------------------------ 4. one-line messages
def write_records(tmp_path, records) -> Path:
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(records))
    return path


GOOD = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}


@pytest.mark.parametrize("second, fragment", [("just a string", "record 1 is a JSON str"),
                                              ({"prompt": "Oslo is in", "subject": "Oslo"}, "record 1 has no 'target_new'")])
def test_a_malformed_record_after_the_first(tmp_path, capsys, no_model_loading, tiny, second, fragment):
    data = write_records(tmp_path, [GOOD, second, GOOD])
    assert_one_line_error(*run_edit(capsys, tiny, "--data", data, "--n", 3), fragment)


def test_data_naming_a_folder(tmp_path, capsys, no_model_loading, tiny):
    assert_one_line_error(*run_edit(capsys, tiny, "--data", tmp_path, "--n", 1), "is a folder")


def test_set_value_that_is_not_yaml(capsys, no_model_loading):
    assert_one_line_error(*run_edit(capsys, HPARAMS, "--data", "x.json", "--set", "layer=[1,"),
                          "--set layer: value '[1,' is not valid YAML")


@pytest.mark.parametrize("device, fragment", [("gpu0", "is not a device name torch knows"),
                                              ("cuda:7", "'cuda:7'")])
def test_unknown_or_unavailable_device(tmp_path, capsys, no_model_loading, tiny, device, fragment):
    assert_one_line_error(*run_edit(capsys, *edit_args(tmp_path, tiny, "--device", device)),
                          "hparams field 'device'", fragment)


def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch, tiny):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug inside megedit")

    monkeypatch.setattr(megedit, "load_model", bug)
    with pytest.raises(RuntimeError, match="a bug inside megedit"):
        main(["edit", *map(str, edit_args(tmp_path, tiny))])


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch, no_model_loading, tiny):
    args = [*map(str, edit_args(tmp_path, tiny, "--offset", "-1"))]
    with pytest.raises(ValueError, match="offset must be >= 0"):
        main(["--debug", "edit", *args])
    monkeypatch.setenv("MEGEDIT_DEBUG", "1")
    with pytest.raises(ValueError, match="offset must be >= 0"):
        main(["edit", *args])


@pytest.mark.parametrize("checkpointed", [False, True])
def test_ctrl_c_says_whether_the_run_resumes(tmp_path, capsys, monkeypatch, checkpointed):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(megedit, "load_model", interrupted)
    tiny_config("llama", 50257).save_pretrained(tmp_path / "m")
    changes = {"checkpoint_dir": str(tmp_path / "ckpt")} if checkpointed else {}
    rc = main(["edit", *map(str, edit_args(tmp_path, tiny_yaml(tmp_path, tmp_path / "m", **changes)))])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err.count("\n") == 0 and err.startswith("megedit edit: interrupted; "), err
    if checkpointed:
        assert f"checkpointed under {tmp_path / 'ckpt'}: run the same command again to resume" in err
    else:
        assert "nothing was saved" in err and "checkpoint_dir" in err


# ------------------------------------------------------------------------------------------ 6. smaller holes
def test_negative_offset(tmp_path, capsys, no_model_loading, tiny):
    assert_one_line_error(*run_edit(capsys, *edit_args(tmp_path, tiny, "--offset", "-2")),
                          "offset must be >= 0 (the first record to edit), got -2")


def test_request_without_a_subject(tmp_path, capsys, no_model_loading, tiny):
    data = write_records(tmp_path, [GOOD, {"prompt": "Oslo is the capital of", "target_new": "Sweden"}])
    assert_one_line_error(*run_edit(capsys, tiny, "--data", data, "--n", 2, "--out", tmp_path / "out"),
                          "request 1 (case_id 1) has no 'subject': MeG builds each edit's near misses from its subject")


def test_apply_meg_refuses_requests_without_a_subject(gpt2_tokenizer):
    from conftest import tiny_model
    from megedit import apply_meg_to_model
    from megedit.hparams import MeGHyperParams

    with pytest.raises(ValueError, match="has no 'subject': MeG builds"):
        apply_meg_to_model(tiny_model("llama"), gpt2_tokenizer, [{k: v for k, v in GOOD.items() if k != "subject"}],
                           MeGHyperParams(model_name="tiny", layer=1))


# ------------------------------------------------------------------------------------------ 3. megedit run
@pytest.fixture()
def run_config(tmp_path, easyedit):
    """A two-method run config on a saved tiny GPT-2 (4 layers); a method run at all fails the test."""
    model_path = save_tiny_model(tmp_path / "tiny-lm")
    meg = tmp_path / "meg.yaml"
    meg.write_text(yaml.safe_dump(meg_hparams(model_path).to_dict()))
    memit = memit_style_hparams(tmp_path, model_path)
    data = write_records(tmp_path, [{**GOOD, "case_id": 0}, {"prompt": "Oslo is the capital of", "subject": "Oslo",
                                                              "target_new": "Sweden", "case_id": 1}])

    def write(methods, **extra):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"data": {"path": str(data)}, "sizes": [2], "methods": methods,
                                        "output": str(tmp_path / "out"), "isolate": False, **extra}))
        return path

    return write, str(meg), str(memit)


@pytest.fixture()
def no_method_runs(monkeypatch):
    monkeypatch.setattr(runner, "run_method", lambda *a, **k: pytest.fail("a method ran before every one was checked"))


def run_cli(capsys, config) -> tuple[int, str]:
    capsys.readouterr()  # what the fixtures printed (saving the tiny model)
    rc = main(["run", str(config), "--no-progress"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return rc, err


@pytest.mark.parametrize("field, value, fragment", [
    ("layer", 99, "hparams field 'layer' = 99 is out of range"),
    ("layer", "abc", "hparams field 'layer' must be int, got 'abc'"),
    ("gen_epochs", 0, "hparams field 'gen_epochs' must be positive"),
    ("encoder_epochs", 0, "hparams field 'encoder_epochs' must be positive"),
    ("device", "cuda:7", "hparams field 'device' = 'cuda:7'")])
def test_run_checks_the_last_methods_overrides_first(capsys, run_config, no_method_runs, field, value, fragment):
    write, meg, memit = run_config
    rc, err = run_cli(capsys, write([memit, {"hparams": meg, "name": "MeG-late", "set": {field: value}}]))
    assert rc == 2 and "method MeG-late" in err and fragment in err, err


@pytest.mark.parametrize("field, value, fragment", [
    ("layers", [1, 9], "hparams field 'layers' = [1, 9] is out of range"),
    ("v_num_grad_steps", 0, "hparams field 'v_num_grad_steps' must be positive (it counts training steps)"),
    ("layers", "abc", "hparams field 'layers' must be")])
def test_run_checks_memit_overrides(capsys, run_config, no_method_runs, field, value, fragment):
    write, meg, memit = run_config
    rc, err = run_cli(capsys, write([meg, {"hparams": memit, "name": "MEMIT-late", "set": {field: value}}]))
    assert rc == 2 and "method MEMIT-late" in err and fragment in err, err


def test_run_with_a_model_that_cannot_load(tmp_path, capsys, run_config, no_method_runs):
    write, meg, memit = run_config
    rc, err = run_cli(capsys, write([meg, memit], model=str(tmp_path / "no-such-model")))
    assert rc == 2 and "hparams field 'model_name'" in err and "cannot read its config" in err, err


def test_run_output_that_is_a_file(tmp_path, capsys, run_config, no_method_runs):
    write, meg, memit = run_config
    (tmp_path / "out").write_text("a file")
    rc, err = run_cli(capsys, write([meg]))
    assert rc == 2 and "output folder" in err and "is a file, not a folder" in err, err


def test_ctrl_c_in_megedit_run_says_how_it_resumes(capsys, run_config, monkeypatch):
    write, meg, memit = run_config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    capsys.readouterr()
    assert main(["run", str(write([meg]))]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "megedit run: interrupted; finished results under" in err
    assert "run the same command again to continue" in err


def test_a_data_file_that_cannot_be_read(tmp_path, capsys, no_model_loading, tiny, monkeypatch):
    """Permission errors are a user's to fix: one line. (root reads any file: there the refusal is the OS's own
    PermissionError, raised for that one file.)"""
    data = edits_file(tmp_path)
    if os.geteuid() == 0:
        real = Path.read_text

        def refuse(self, *args, **kwargs):
            if self == data:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", refuse)
    else:
        data.chmod(0)
    assert_one_line_error(*run_edit(capsys, tiny, "--data", data, "--n", 4, "--out", tmp_path / "out"),
                          "Permission denied", str(data))
