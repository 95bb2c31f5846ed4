"""Load the model an EasyEdit hparams file names, the way every megedit tool that talks to EasyEdit does.

One loader for the editor, ``megedit stats`` and ``megedit run``, so all three see the same model under the same
``config._name_or_path``. EasyEdit names its covariance files after ``_name_or_path``; megedit sets it to the
``model_name`` written in the hparams file (a builtin name such as ``smollm2-135m`` would otherwise become a
machine-specific cache folder), so a statistics file computed once is found on any machine.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..loading import load_model


def load_model_named(model_name: str, device: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a builtin name, hub id, local folder or ``.gguf`` file; eval mode, on ``device``."""
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    device = device or "cpu"
    if model_name.lower().endswith(".gguf"):
        model, tok = _load_gguf(Path(model_name), device, dtype)
    else:
        model, tok = load_model(model_name, device=device, dtype=dtype)
    model.config._name_or_path = model_name
    return model, tok


def _load_gguf(path: Path, device: str, dtype: torch.dtype):
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def normalise_device(device) -> str:
    """EasyEdit's device convention as a torch device string: an int (or digits) N means "cuda:N"."""
    if device is None:
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    text = str(device).strip()
    return f"cuda:{text}" if text.isdigit() else text
