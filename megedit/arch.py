"""Where each supported architecture keeps its decoder layers and MLP, and which neuron form it takes.

Everything architecture-specific in megedit is in this table, so adding a model family is one entry. Beside it: the
layout of a neuron's weight vector in each form (``neuron_size``, ``neuron_parts``) and the fingerprint that ties a
saved edit to the base model it was trained on (``base_fingerprint``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ArchSpec:
    """How to reach layer ``i``'s MLP and how one extra neuron joins it.

    form "gated": the official MeG Llama form — an un-gated, un-activated ``x·w_in`` whose output joins act(gate)·up
    before down_proj, i.e. the MLP gains ``(x·w_in)·w_out``; neuron vector = [w_in (d), w_out (d)].
    form "dense": one more row of the first projection (weights + bias) and one more column of the second, through the
    MLP's own activation: the MLP gains ``act(x·w_in + b)·w_out``; neuron vector = [w_in (d), b (1), w_out (d)].
    """

    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    mlp: str  # attribute of a decoder layer holding the MLP
    final_norm: str  # dotted path from the CausalLM to the norm applied before the LM head
    form: str  # "gated" or "dense"
    act: str | None = None  # attribute of the MLP holding its activation (dense form only)


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "mlp", "transformer.ln_f", "dense", act="act"),
    "gptj": ArchSpec("transformer.h", "mlp", "transformer.ln_f", "dense", act="act"),
    "phi": ArchSpec("model.layers", "mlp", "model.final_layernorm", "dense", act="activation_fn"),
    "llama": ArchSpec("model.layers", "mlp", "model.norm", "gated"),
    "mistral": ArchSpec("model.layers", "mlp", "model.norm", "gated"),
    "qwen2": ArchSpec("model.layers", "mlp", "model.norm", "gated"),
    "qwen3": ArchSpec("model.layers", "mlp", "model.norm", "gated"),
}


def spec_for(model_type: str | None) -> ArchSpec:
    if model_type not in ARCHS:
        raise ValueError(
            f"megedit does not know where the MLP of model_type={model_type!r} is; supported: {sorted(ARCHS)}. "
            "Add an ArchSpec to megedit.arch.ARCHS."
        )
    return ARCHS[model_type]


def arch_of(model: nn.Module) -> ArchSpec:
    return spec_for(getattr(getattr(model, "config", None), "model_type", None))


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"module path {path!r} does not exist in {type(root).__name__} (no {part!r}); fix the "
                             "ArchSpec of this model type in megedit.arch.ARCHS")
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_of(model).layers)


def mlp_of(model: nn.Module, layer: int) -> nn.Module:
    """The MLP of decoder layer ``layer``: where the neuron acts."""
    return getattr(decoder_layers(model)[layer], arch_of(model).mlp)


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")


# ------------------------------------------------------------------------------------- a neuron's weight vector
def neuron_length(form: str, d: int) -> int:
    """Length of one neuron's weight vector: [w_in (d), w_out (d)] gated; [w_in (d), b (1), w_out (d)] dense."""
    return 2 * d if form == "gated" else 2 * d + 1


def neuron_size(model: nn.Module) -> int:
    """Length of one neuron's weight vector for this model."""
    return neuron_length(arch_of(model).form, hidden_size(model))


def neuron_parts(weights: torch.Tensor, form: str, d: int):
    """(w_in (n, d), bias (n,) or None for the gated form, w_out (n, d)): views into neuron vectors ``weights`` (n, P)."""
    if form == "gated":
        return weights[:, :d], None, weights[:, d:]
    return weights[:, :d], weights[:, d], weights[:, d + 1:]


def _layer_range_error(layer: int, model_type: str, n: int) -> ValueError:
    return ValueError(f"hparams field 'layer' = {layer} is out of range: this {model_type} model has {n} decoder layers; "
                      f"set layer to one of 0..{n - 1}")


def check_config(config, layer: int) -> None:
    """What can be checked from the model's config alone, before its weights are loaded."""
    spec_for(config.model_type)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if n is not None and not 0 <= layer < n:
        raise _layer_range_error(layer, config.model_type, n)


def check_layer(model: nn.Module, layer: int) -> None:
    """The layer exists and its MLP and final norm are where ``ARCHS`` says (before any work starts)."""
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise _layer_range_error(layer, model.config.model_type, n)
    spec = arch_of(model)
    if not hasattr(decoder_layers(model)[layer], spec.mlp):
        raise ValueError(f"module path '{spec.layers}.{layer}.{spec.mlp}' does not exist in {type(model).__name__}; "
                         f"fix the ArchSpec of {model.config.model_type!r} in megedit.arch.ARCHS")
    get_module(model, spec.final_norm)


# ------------------------------------------------------------------------------------- the base model's fingerprint
STRUCTURE = ("model_type", "config_class", "num_layers", "hidden_size", "vocab_size", "layer")  # must always match


def _tensor_bytes(t: torch.Tensor):
    """The tensor's raw bytes as a buffer (no extra copy on the CPU), whatever its dtype."""
    return t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()


def base_fingerprint(model: nn.Module, layer: int) -> dict:
    """What identifies the base model an edit belongs to: sizes, dtype and a hash of the weights the edit reads."""
    spec = arch_of(model)
    tensors = {"embedding": model.get_input_embeddings().weight,
               **{f"{spec.layers}.{layer}.{spec.mlp}.{n}": p for n, p in mlp_of(model, layer).named_parameters()}}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensors[name]))
    return {"model_type": model.config.model_type, "config_class": type(model.config).__name__,
            "num_layers": len(decoder_layers(model)), "hidden_size": hidden_size(model),
            "vocab_size": tensors["embedding"].shape[0], "layer": layer, "dtype": str(tensors["embedding"].dtype),
            "weights_sha256": digest.hexdigest()}


def check_base_model(saved: dict, model: nn.Module, source: str, strict: bool = True) -> None:
    """Raise ValueError naming the first difference between ``saved`` and ``model``'s fingerprint."""
    current = base_fingerprint(model, min(saved["layer"], len(decoder_layers(model)) - 1))  # num_layers tells
    keys = STRUCTURE + (("dtype", "weights_sha256") if strict else ())
    for key in keys:
        if saved.get(key) != current.get(key):
            hint = ("" if key in STRUCTURE else
                    "; pass strict=False to load it anyway onto a model of the same shape (its answers may differ)")
            raise ValueError(f"{source} was made for a different base model: its {key} is {saved.get(key)!r}, this "
                             f"model's is {current.get(key)!r}. Load it onto the model it was trained on{hint}")
