"""`megedit stats`: covariance files in EasyEdit's exact layout, which the wheel loads without trying a download."""
import argparse
import importlib
import json

import numpy as np
import pytest
import torch

from megedit.stats import easyedit_stats_path, precompute_stats, text_documents
from conftest import TEXTS, memit_style_hparams, save_tiny_model, write_texts

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 whose _name_or_path has a "/" (so the wheel's and GitHub's folder names differ), its stats files."""
    root = tmp_path_factory.mktemp("stats")
    model_path = save_tiny_model(root / "org" / "tiny-lm")
    hp_path = memit_style_hparams(root, model_path)
    texts = write_texts(root)
    written = precompute_stats(hp_path, sources=[str(texts)], progress=False)
    return root, model_path, hp_path, texts, written


def test_files_in_both_naming_conventions(setup):
    root, model_path, _, _, written = setup
    wheel_dir, github_dir = model_path.replace("/", "_"), "tiny-lm"
    expected = {easyedit_stats_path(root / "stats", d, "tiny_text", f"transformer.h.{layer}.mlp.c_proj", "float32",
                                    len(TEXTS)) for d in (wheel_dir, github_dir) for layer in (1, 2)}
    assert set(written) == expected and all(p.exists() for p in expected)
    assert written[0].name == f"transformer.h.1.mlp.c_proj_float32_mom2_{len(TEXTS)}.npz"
    with np.load(written[0]) as f:
        assert set(f.files) == {"mom2.mom2", "mom2.count", "mom2.constructor", "sample_size"}
        assert f["mom2.mom2"].shape == (128, 128) and f["mom2.mom2"].dtype == np.float32
        assert int(f["sample_size"]) == len(TEXTS) and str(f["mom2.constructor"]).endswith("SecondMoment()")


def test_moments_equal_a_plain_per_document_sum(setup):
    """Batching and padding must not change the statistics: compare with one document at a time, no padding."""
    _, model_path, _, texts, written = setup
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    grabbed = []
    handle = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(lambda m, a: grabbed.append(a[0][0]))
    with torch.no_grad():
        for doc in text_documents([str(texts)]):
            model(torch.tensor([tok.encode(doc)]))
    handle.remove()
    x = torch.cat(grabbed).double()
    with np.load(written[0]) as f:
        assert int(f["mom2.count"]) == x.shape[0]
        np.testing.assert_allclose(f["mom2.mom2"], (x.T @ x).numpy(), rtol=1e-4, atol=1e-5)


def test_easyedit_loads_the_file_without_downloading(setup, monkeypatch, easyedit):
    """The wheel's own get_cov/layer_stats (megedit's download guard left out) must find the file and never call
    load_dataset; the moment it returns is the file's sum divided by its count."""
    from megedit.easyedit import compat, load_hparams

    root, model_path, hp_path, _, written = setup
    layer_stats = importlib.import_module("easyeditor.models.rome.layer_stats")
    memit_main = importlib.import_module("easyeditor.models.memit.memit_main")
    calls = []
    monkeypatch.setattr(layer_stats, "load_dataset", lambda *a, **k: calls.append(a) or pytest.fail("download"))
    monkeypatch.setattr(memit_main, "COV_CACHE", {})
    from megedit.easyedit.loader import load_model_named

    model, tok = load_model_named(model_path)
    hp = load_hparams(hp_path)
    with compat.runtime(skip=("no_download",)):
        cov = memit_main.get_cov(model, tok, "transformer.h.1.mlp.c_proj", hp.mom2_dataset, hp.mom2_n_samples,
                                 hp.mom2_dtype, hparams=hp)
    with np.load(written[0]) as f:
        expected = f["mom2.mom2"] / int(f["mom2.count"])
    assert not calls
    np.testing.assert_allclose(cov.numpy(), expected, rtol=1e-6)


def test_second_run_skips_and_errors_are_clear(setup, capsys):
    from megedit.cli_stats import add_parser

    _, _, hp_path, texts, _ = setup
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["stats", str(hp_path), "--sources", str(texts)])
    assert args.func(args) == 0
    assert "already exist" in capsys.readouterr().out
    with pytest.raises(ValueError, match="only 2 documents"):
        precompute_stats(hp_path, sources=[str(write_texts(hp_path.parent / "few", TEXTS[:2]))], force=True,
                         progress=False)


def test_documents_are_true_facts_never_the_new_targets(tmp_path):
    record = {"case_id": 0, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
              "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
              "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    (doc,) = text_documents([str(path)])
    assert doc == ("Toko Yasuda, the guitar. Toko Yasuda is incredible at guitar. "
                   "John Lennon performs on the guitar.")
    assert "piano" not in doc
