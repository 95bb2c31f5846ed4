"""training_precision: bfloat16 autocast where it is fast, in the stages it is meant for, never at query time."""
import pytest
import torch

import megedit.meg_main as meg_main
from megedit.dit import DiT
from megedit.fitting import fit_neurons
from megedit.generator import NeuronGenerator
from megedit.hparams import HParamsError, MeGHyperParams
from megedit.meg_main import apply_meg_to_model
from megedit.precision import autocast_dtype, training_autocast

from test_fitting import FIT_ARCHS, TARGETS, VIEWS, answer_argmax, model_for_fitting
from test_fitting import hparams as fitting_hparams
from test_generator import C, E, P, relative_error, task
from test_generator import hparams as generator_hparams
from tiny_meg import EDITS, count_stage_calls, tiny_base, tiny_hparams


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def test_precision_names(monkeypatch):
    assert autocast_dtype("float32", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    for fast in (True, False):  # auto follows what the CPU multiplies natively
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if fast else None)
    with pytest.raises(ValueError, match="training_precision must be one of"):
        autocast_dtype("half", "cpu")


def test_hparams_refuse_an_unknown_precision():
    with pytest.raises(HParamsError, match=r"'training_precision' must be one of \('float32', 'bfloat16', 'auto'\)"):
        MeGHyperParams(model_name="tiny-llama", layer=1, training_precision="fp16")


def test_dit_under_cpu_autocast_is_close_to_float32():
    torch.manual_seed(0)
    net = DiT(100, 24, patch_size=16, hidden=32, depth=2, heads=2)
    for p in net.parameters():  # away from the zero initialisation, so the output depends on every block
        p.data.normal_(0, 0.2)
    x, t, c = torch.randn(8, 100), torch.randint(0, 1000, (8,)), torch.randn(8, 24)
    exact = net(x, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t, c)
    assert low.dtype == torch.bfloat16
    err = (low.float() - exact).norm() / exact.norm()
    assert 0 < err < 0.05  # rounded, and only rounded


def watch_autocast(monkeypatch) -> dict[str, set[bool]]:
    """Record, per stage unit, whether CPU autocast was on when it ran."""
    seen: dict[str, set[bool]] = {}
    count_stage_calls(monkeypatch.setattr, lambda event: seen.setdefault(event, set()).add(
        torch.is_autocast_enabled("cpu")))
    real_thresholds = meg_main.choose_thresholds
    monkeypatch.setattr(meg_main, "choose_thresholds", lambda *a, **k: seen.setdefault(
        "thresholds", set()).add(torch.is_autocast_enabled("cpu")) or real_thresholds(*a, **k))
    return seen


def train(tmp_path, monkeypatch, precision: str):
    seen = watch_autocast(monkeypatch)
    model, tok = tiny_base()
    edited, _ = apply_meg_to_model(model, tok, EDITS, tiny_hparams(tmp_path, training_precision=precision),
                                   progress=False)
    return edited, seen


def test_bfloat16_training_autocasts_the_heavy_stages_only(tmp_path, monkeypatch):
    edited, seen = train(tmp_path, monkeypatch, "bfloat16")
    assert seen == {"encoder": {False}, "embed": {True}, "familiarity": {True}, "fit": {True}, "gen": {True},
                    "thresholds": {False}}
    assert edited.report["training_autocast"] == "bfloat16"
    # what is kept and used at query time stays in its float32 (the gate's key table: float16, as always)
    for part in (edited.edit.encoder, edited.edit.familiarity, edited.edit.generator):
        assert {t.dtype for t in part.state_dict().values() if t.is_floating_point()} <= {torch.float32, torch.float16}
    with pytest.MonkeyPatch.context() as mp:
        edited32, seen32 = train(tmp_path, mp, "float32")
    assert all(flags == {False} for flags in seen32.values()) and edited32.report["training_autocast"] == "float32"


@pytest.mark.parametrize("arch", FIT_ARCHS)
def test_neurons_fitted_under_autocast_work_in_the_float32_model(arch, gpt2_tokenizer):
    model = model_for_fitting(arch)
    with training_autocast(torch.bfloat16, "cpu"):
        res = fit_neurons(model, gpt2_tokenizer, VIEWS, TARGETS, fitting_hparams(), progress=False)
    assert res.ok.all()
    for e, views in enumerate(VIEWS):
        for view in views:  # full-model teacher forcing, float32, no autocast
            pred, gold = answer_argmax(model, gpt2_tokenizer, view, TARGETS[e], res.weights[e])
            assert pred == gold, (view, TARGETS[e])


def test_generator_trained_under_autocast_memorises():
    conds, targets = task()
    hp = generator_hparams(gen_epochs=600)
    gen = NeuronGenerator(P, C, hp)
    with training_autocast(torch.bfloat16, "cpu"):  # one context over every step, as train_meg runs it
        stats = gen.train_on(conds, torch.arange(E), targets, hp, progress=False)
    assert stats["loss"] < 0.2
    assert relative_error(gen.sample(conds, steps=1), targets) < 0.45  # sampled in float32
