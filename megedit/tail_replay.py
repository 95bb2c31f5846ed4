"""Replay only what a neuron fit changes: the upper layers, at the answer positions.

While fitting, the neuron acts at the "tail" of each sequence — the last prompt token and the answer tokens, i.e. the
positions whose logits predict the answer. Nothing below layer L and nothing at earlier positions depends on it, so one
no-grad pass caches (a) the keys/values of the prompt prefix at every layer, (b) the hidden states entering layer L at
the tail, (c) the MLP inputs of layer L everywhere, and (d) the exact arguments each upper layer received (mask,
positions, rotary tables). Every fitting step then runs layers L..N-1 on a few tail tokens per sequence, attending to
the cached prefix, plus the LM head at those tokens. The result equals the full model's logits there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import DynamicCache

from .arch import arch_of, decoder_layers, get_module, hidden_size, mlp_of


@dataclass
class TailBatch:
    """Sequences split into a left-padded prefix and a right-padded tail (see ``split_tail``)."""

    prefix_ids: torch.Tensor  # (S, P)
    prefix_mask: torch.Tensor  # (S, P)
    tail_ids: torch.Tensor  # (S, Tt)
    tail_mask: torch.Tensor  # (S, Tt)
    labels: torch.Tensor  # (S, Tt) the token each tail position must predict, -100 where none


def split_tail(full_ids: list[list[int]], prompt_lengths: list[int], pad_id: int) -> TailBatch:
    """Prefix = prompt minus its last token; tail = last prompt token + answer tokens but the last."""
    S = len(full_ids)
    prefixes = [ids[: pl - 1] for ids, pl in zip(full_ids, prompt_lengths)]
    tails = [ids[pl - 1: -1] for ids, pl in zip(full_ids, prompt_lengths)]
    labels = [ids[pl:] for ids, pl in zip(full_ids, prompt_lengths)]
    P, Tt = max(map(len, prefixes)), max(map(len, tails))
    out = TailBatch(torch.full((S, P), pad_id), torch.zeros(S, P, dtype=torch.long), torch.full((S, Tt), pad_id),
                    torch.zeros(S, Tt, dtype=torch.long), torch.full((S, Tt), -100))
    for i, (p, t, y) in enumerate(zip(prefixes, tails, labels)):
        if p:
            out.prefix_ids[i, P - len(p):] = torch.tensor(p)
            out.prefix_mask[i, P - len(p):] = 1
        out.tail_ids[i, : len(t)] = torch.tensor(t)
        out.tail_mask[i, : len(t)] = 1
        out.labels[i, : len(y)] = torch.tensor(y)
    return out


class _PrefixKV:
    """A read-only stand-in for a KV cache: returns the cached prefix keys/values of ``rows`` + the new ones."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: torch.Tensor | None):
        self.keys, self.values, self.rows = keys, values, rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is not None:
            k, v = k[self.rows.to(k.device)], v[self.rows.to(v.device)]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)


class TailStack:
    """Layers ``layer..N-1`` of ``model``, ready to replay on the tail of ``batch``."""

    def __init__(self, model: nn.Module, layer: int, batch: TailBatch):
        device = next(model.parameters()).device  # where the inputs go (the embeddings')
        self.layers = list(decoder_layers(model))[layer:]
        self.final_norm = get_module(model, arch_of(model).final_norm)
        self.lm_head = model.get_output_embeddings()
        self.batch_size = batch.tail_ids.shape[0]
        mlp = mlp_of(model, layer)
        # where the neuron acts: with a device_map, layer `layer` may sit on another device than the embeddings
        self.device = next(mlp.parameters()).device
        mask = torch.cat([batch.prefix_mask, batch.tail_mask], 1).to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        P = batch.prefix_ids.shape[1]
        n_layers = len(decoder_layers(model))
        keys, values, prefix_mlp_in = self._prefix_pass(model, mlp, batch, n_layers, device, self.device)
        cache = DynamicCache(config=model.config)
        if P:
            for i in range(n_layers):
                cache.update(keys[i], values[i], i)
        mlp_inputs: list[torch.Tensor] = []
        self.calls: list[tuple[tuple, dict]] = []
        hooks = [mlp.register_forward_pre_hook(lambda m, a: mlp_inputs.append(a[0].detach()))]
        hooks += [lyr.register_forward_pre_hook(self._capture, with_kwargs=True) for lyr in self.layers]
        try:
            with torch.no_grad():
                model(input_ids=batch.tail_ids.to(device), attention_mask=mask, position_ids=positions[:, P:],
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        self.prefix_kv = (keys, values)
        self._cache = cache
        args, kwargs = self.calls[0]
        # (S, Tt, d) entering layer `layer`; a pre-hook sees it before a device_map's hook moves it to the layer
        self.hidden = (args[0] if args else kwargs["hidden_states"]).detach().to(self.device)
        # MLP inputs of layer `layer` (unchanged by the neuron, which acts on its output): prefix and tail
        self.prefix_mlp_in = prefix_mlp_in
        self.tail_mlp_in = mlp_inputs[0]
        self.prefix_mask = batch.prefix_mask.to(self.device)
        self.tail_mask = batch.tail_mask.to(self.device)

    @staticmethod
    @torch.no_grad()
    def _prefix_pass(model, mlp, batch: TailBatch, n_layers: int, device, mlp_device, bucket: int = 64):
        """Keys/values of every layer and the MLP inputs of the edited layer over the left-padded prefixes.

        Sequences run in buckets of similar length, so short prefixes are not padded to the longest one.
        """
        S, P = batch.prefix_ids.shape
        d = hidden_size(model)
        keys: list[torch.Tensor | None] = [None] * n_layers
        values: list[torch.Tensor | None] = [None] * n_layers
        mlp_in = torch.zeros(S, P, d, device=mlp_device, dtype=next(model.parameters()).dtype)
        if P == 0:
            return keys, values, mlp_in
        lengths = batch.prefix_mask.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        for start in range(0, S, bucket):
            rows = order[start:start + bucket]
            width = max(int(lengths[rows].max()), 1)
            ids, m = batch.prefix_ids[rows, P - width:].to(device), batch.prefix_mask[rows, P - width:].to(device)
            cache = DynamicCache(config=model.config)
            seen = []
            hook = mlp.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
            try:
                model(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0),
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
            finally:
                hook.remove()
            mlp_in[rows.to(mlp_device), P - width:] = seen[0]
            for i in range(n_layers):
                k, v = cache.layers[i].keys, cache.layers[i].values
                if keys[i] is None:
                    keys[i] = k.new_zeros(S, k.shape[1], P, k.shape[3])
                    values[i] = v.new_zeros(S, v.shape[1], P, v.shape[3])
                keys[i][rows.to(k.device), :, P - width:] = k  # each layer's cache stays on that layer's device
                values[i][rows.to(v.device), :, P - width:] = v
        return keys, values, mlp_in

    def _capture(self, module, args, kwargs):
        self.calls.append((args, kwargs))

    def _select(self, value, rows):
        if value is self._cache:
            return _PrefixKV(*self.prefix_kv, rows)
        if rows is None:
            return value
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == self.batch_size:
            return value[rows.to(value.device)]
        if isinstance(value, tuple):
            return tuple(self._select(v, rows) for v in value)
        return value

    def forward_hidden(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the upper layers on ``hidden`` (the tail states of sequences ``rows``, or of all)."""
        for layer, (args, kwargs) in zip(self.layers, self.calls):
            args = tuple(self._select(a, rows) for a in args[1:])
            kwargs = {k: self._select(v, rows) for k, v in kwargs.items() if k != "hidden_states"}
            out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def logits(self, hidden: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """LM-head logits of final hidden states at (seq[i], pos[i]): (n, vocab), on the edited layer's device."""
        at = hidden[seq.to(hidden.device), pos.to(hidden.device)]
        return self.lm_head(self.final_norm(at)).to(self.device)
