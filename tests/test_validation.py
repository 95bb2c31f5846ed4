"""Bad input to the Python API fails before any training, with one message naming the field and the fix.

(Hparams files: test_hparams.py. Data files and request dicts: test_data.py. The command line: test_cli.py.)
"""
import pytest

import megedit.meg_main as meg_main
from megedit.arch import check_config, spec_for
from megedit.data import make_requests
from megedit.fitting import fit_neurons
from megedit.hparams import MeGHyperParams
from megedit.meg_main import apply_meg_to_model

from conftest import tiny_config, tiny_model

REQUESTS = [{"case_id": 1, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}]


@pytest.fixture()
def no_training(monkeypatch):
    """Any stage starting fails the test."""
    def tripwire(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    for stage in ("load_encoder", "tune_encoder", "train_familiarity", "fit_neurons"):
        monkeypatch.setattr(meg_main, stage, tripwire)


def hp(**kw):
    return MeGHyperParams(**{"model_name": "tiny", "layer": 1, "familiarity_epsilon": 1.0, **kw})


def test_layer_out_of_range(no_training, gpt2_tokenizer):
    with pytest.raises(ValueError, match=r"^hparams field 'layer' = 3 is out of range: this llama model has 3 decoder "
                                         r"layers; set layer to one of 0\.\.2$"):
        apply_meg_to_model(tiny_model("llama"), gpt2_tokenizer, REQUESTS, hp(layer=3))


def test_layer_out_of_range_from_the_config_alone():
    check_config(tiny_config("gpt2", 100), 2)
    with pytest.raises(ValueError, match=r"'layer' = 7 is out of range: this gpt2 model has 3 decoder layers"):
        check_config(tiny_config("gpt2", 100), 7)


def test_unsupported_architecture():
    with pytest.raises(ValueError, match=r"model_type='bert' is; supported: \[.*'llama'.*\]\. Add an ArchSpec to "
                                         r"megedit\.arch\.ARCHS"):
        spec_for("bert")


@pytest.mark.parametrize("missing, path", [("mlp", "model.layers.1.mlp"), ("norm", "model.norm")])
def test_module_path_that_does_not_exist(no_training, gpt2_tokenizer, missing, path):
    model = tiny_model("llama")
    owner = model.model.layers[1] if missing == "mlp" else model.model
    delattr(owner, missing)
    with pytest.raises(ValueError, match=rf"module path '{path}' does not exist in LlamaForCausalLM.*fix the ArchSpec"):
        apply_meg_to_model(model, gpt2_tokenizer, REQUESTS, hp())


def test_hparams_of_the_wrong_kind(no_training, gpt2_tokenizer):
    with pytest.raises(TypeError, match=r"hparams must be a MeGHyperParams .*got dict"):
        apply_meg_to_model(tiny_model("llama"), gpt2_tokenizer, REQUESTS, {"model_name": "tiny", "layer": 1})


def test_requests_are_checked_before_the_model(no_training, gpt2_tokenizer):
    with pytest.raises(ValueError, match="the request list is empty"):
        apply_meg_to_model(tiny_model("llama"), gpt2_tokenizer, [], hp())
    bad = [{**REQUESTS[0], "target_new": "  "}]
    with pytest.raises(ValueError, match=r"request 0 \(case_id 1\): 'target_new' must be a non-empty string"):
        apply_meg_to_model(tiny_model("llama"), gpt2_tokenizer, bad, hp())


def test_nothing_to_choose_epsilon_on(no_training, gpt2_tokenizer):
    with pytest.raises(ValueError, match="without pseudo_edit_data there is nothing to choose epsilon on: set "
                                         "familiarity_epsilon"):
        apply_meg_to_model(tiny_model("llama"), gpt2_tokenizer, REQUESTS, hp(familiarity_epsilon=None))


def test_missing_pseudo_edit_file(no_training, gpt2_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-pool.json' does not exist"):
        apply_meg_to_model(tiny_model("llama"), gpt2_tokenizer, REQUESTS,
                           hp(pseudo_edit_data=str(tmp_path / "no-pool.json")))


def test_parallel_lists_of_different_lengths():
    reqs = make_requests(["A B is", "C D is"], ["x", "y"], subject=["A B", "C D"])
    assert [(r["prompt"], r["target_new"], r["subject"], r["case_id"]) for r in reqs] == [
        ("A B is", "x", "A B", 0), ("C D is", "y", "C D", 1)]
    assert make_requests("A B is", "x")[0]["target_new"] == "x"  # one edit may be given as strings
    with pytest.raises(ValueError, match=r"^prompts has 2 items but target_new has 1: give one target_new per prompt"):
        make_requests(["A B is", "C D is"], ["x"])
    with pytest.raises(ValueError, match="prompts has 2 items but subject has 3"):
        make_requests(["A B is", "C D is"], ["x", "y"], subject=["A B", "C D", "E"])
    with pytest.raises(ValueError, match="subject 'E' is not a substring"):  # and each request is then validated
        make_requests(["A B is"], ["x"], subject=["E"])


def test_fit_views_and_targets_of_different_lengths(gpt2_tokenizer):
    with pytest.raises(ValueError, match="views has 2 edits but targets has 1: give one target per edit"):
        fit_neurons(tiny_model("llama"), gpt2_tokenizer, [["a"], ["b"]], ["x"], hp(), progress=False)

