"""The dynamic neuron: one extra MLP unit whose weights are supplied per sample, per call.

``DynamicNeuron`` is attached to a model's MLP (the MLP module itself stays in place, untouched). The weights for
the current call live in a ``ContextVar``, not on the module, so concurrent threads never see each other's neurons and
nothing survives the ``with active_neurons(...)`` block that set them. Rows without a neuron keep the base output
bit-for-bit.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn as nn

from .arch import arch_of, check_layer, decoder_layers, hidden_size, mlp_of, neuron_parts


@dataclass(frozen=True)
class NeuronBatch:
    """Neuron weights for some rows of a batch: ``weights[i]`` belongs to batch row ``rows[i]`` of a batch of ``batch_size``."""

    rows: torch.Tensor  # (n,) long
    weights: torch.Tensor  # (n, P)
    batch_size: int

    def for_batch(self, batch_size: int) -> "NeuronBatch":
        """The same neurons for a batch expanded by ``generate`` (beams / num_return_sequences repeat each row k times)."""
        if batch_size == self.batch_size:
            return self
        if batch_size % self.batch_size:
            raise RuntimeError(f"batch of {batch_size} does not expand the routed batch of {self.batch_size}")
        k = batch_size // self.batch_size
        rows = (self.rows[:, None] * k + torch.arange(k, device=self.rows.device)).reshape(-1)
        return NeuronBatch(rows, self.weights.repeat_interleave(k, dim=0), batch_size)


_ACTIVE: ContextVar[NeuronBatch | None] = ContextVar("megedit_active_neurons", default=None)


@contextmanager
def active_neurons(batch: NeuronBatch | None):
    """Make ``batch`` the neurons of every DynamicNeuronMLP called inside this block (this thread/context only)."""
    token = _ACTIVE.set(batch)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_neurons() -> NeuronBatch | None:
    return _ACTIVE.get()


def neuron_activation(x: torch.Tensor, weights: torch.Tensor, form: str, act, d: int) -> torch.Tensor:
    """The neuron's activation at MLP inputs x (n, T, d) for weights (n, P) -> (n, T): ``x·w_in`` in the gated form,
    ``act(x·w_in + b)`` in the dense form (``act``: the MLP's activation; see ``megedit.arch.ArchSpec``)."""
    w_in, bias, _ = neuron_parts(weights, form, d)
    pre = torch.einsum("ntd,nd->nt", x, w_in)
    return pre if form == "gated" else act(pre + bias[:, None])


class DynamicNeuron(nn.Module):
    """One neuron with per-sample weights, attached to an MLP as a forward hook (see ``megedit.arch.ArchSpec``).

    The MLP is not replaced: parameter names and ``state_dict`` keys of the model stay exactly as they were, so tools
    that address weights by name (EasyEdit's restore, MEMIT, save_pretrained) keep working while an edit is on.
    """

    def __init__(self, form: str, act: str | None, d_model: int):
        super().__init__()
        self.form = form
        self.act_name = act
        self.d_model = d_model
        self.handle = None

    def neuron_output(self, mlp: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """What the neuron adds to the MLP output: x (n, T, d) MLP inputs, weights (n, P) -> (n, T, d)."""
        weights = weights.to(x.dtype)
        act = getattr(mlp, self.act_name) if self.form == "dense" else None
        a = neuron_activation(x, weights, self.form, act, self.d_model)  # (n, T)
        return a.unsqueeze(-1) * neuron_parts(weights, self.form, self.d_model)[2][:, None, :]

    def hook(self, mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        batch = _ACTIVE.get()
        if batch is None or batch.rows.numel() == 0:
            return out
        x = args[0]
        batch = batch.for_batch(x.shape[0])
        rows = batch.rows.to(x.device)
        delta = self.neuron_output(mlp, x[rows], batch.weights.to(x.device))
        if rows.numel() == x.shape[0] and bool((rows == torch.arange(len(rows), device=rows.device)).all()):
            return out + delta  # every row edited (neuron fitting): no scatter needed
        return out.index_add(0, rows, delta.to(out.dtype))  # untouched rows are copied bit-for-bit


def inject_neuron(model: nn.Module, layer: int) -> DynamicNeuron:
    """Attach a DynamicNeuron to layer ``layer``'s MLP (idempotent) and return it."""
    check_layer(model, layer)
    mlp = mlp_of(model, layer)
    if isinstance(getattr(mlp, "megedit_neuron", None), DynamicNeuron):
        return mlp.megedit_neuron
    spec = arch_of(model)
    neuron = DynamicNeuron(spec.form, spec.act, hidden_size(model))
    neuron.handle = mlp.register_forward_hook(neuron.hook)
    mlp.megedit_neuron = neuron  # no parameters or buffers: state_dict keys are unchanged
    return neuron


def remove_neuron(model: nn.Module) -> int:
    """Detach every DynamicNeuron; returns how many were removed. The model is then exactly as before."""
    removed = 0
    for i in range(len(decoder_layers(model))):
        mlp = mlp_of(model, i)
        neuron = getattr(mlp, "megedit_neuron", None)
        if isinstance(neuron, DynamicNeuron):
            neuron.handle.remove()
            del mlp.megedit_neuron
            removed += 1
    return removed


def injected_layer(model: nn.Module) -> int | None:
    for i in range(len(decoder_layers(model))):
        if isinstance(getattr(mlp_of(model, i), "megedit_neuron", None), DynamicNeuron):
            return i
    return None
