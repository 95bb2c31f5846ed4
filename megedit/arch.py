"""Where each supported architecture keeps its decoder layers and MLP, and which neuron form it takes.

Everything architecture-specific in megedit is in this table, so adding a model family is one entry.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")


def neuron_size(model: nn.Module) -> int:
    """Length of one neuron's weight vector for this model."""
    d = hidden_size(model)
    return 2 * d if arch_of(model).form == "gated" else 2 * d + 1


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
