"""The edited model at run time: query → encoder → familiarity gate → generator → neuron → LLM.

``MeGEdit`` holds what MeG learned for a set of edits (the artifact). ``MeGModel`` wraps the frozen LLM like a PEFT
model: a drop-in ``nn.Module`` whose ``forward`` and ``generate`` route every sample from its own tokens. The decision is
taken once per sequence, on the prompt (prefill), and kept while decoding; it lives in a context variable for the
duration of the call, never on a shared module, so calls (and threads) cannot leak routing into each other.

How an edited model answers can be tuned at query time, without retraining (``QuerySettings``): the generator's
number of sampling steps and the gate's two thresholds, given to ``MeGModel`` or ``MeGModel.from_pretrained``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .arch import base_fingerprint

from .encoder import embed
from .familiarity import FamiliarityNet
from .neuron import NeuronBatch, active_neurons, current_neurons, inject_neuron, remove_neuron

_ROUTE_ATTR = "_megedit_route"  # set on a KV cache that a MeGModel forward returned, for manual step-by-step decoding


@dataclass(frozen=True)
class QuerySettings:
    """Query-time settings of an edited model; None keeps what the edit was trained and calibrated with.

    - ``sample_steps``: the generator's sampling steps (hparams ``sample_steps``; ignored by the MLP generator);
    - ``epsilon``: the gate opens only below this entropy (the calibrated ``familiarity.epsilon``);
    - ``tau``: ... and only at or above this similarity to the nearest edit view (the calibrated ``familiarity.tau``).

    ``QuerySettings(epsilon=math.inf, tau=-math.inf)`` switches the gate off: every query gets a generated neuron.
    """

    sample_steps: int | None = None
    epsilon: float | None = None
    tau: float | None = None

    def __post_init__(self):
        if self.sample_steps is not None and (isinstance(self.sample_steps, bool) or not isinstance(
                self.sample_steps, int) or self.sample_steps <= 0):
            raise ValueError(f"sample_steps must be a positive integer, got {self.sample_steps!r}")
        for name in ("epsilon", "tau"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
                raise ValueError(f"{name} must be a number (or None for the calibrated value), got {value!r}")


GATE_OFF = QuerySettings(epsilon=math.inf, tau=-math.inf)


class MeGEdit(nn.Module):
    """Encoder + familiarity gate + weight generator, and the layer whose MLP gets the neuron."""

    def __init__(self, encoder: nn.Module, familiarity: FamiliarityNet, generator: nn.Module, layer: int, hparams,
                 base_fingerprint: dict | None = None, edits: list[dict] | None = None,
                 key_edit: list[int] | None = None, relation=None):
        super().__init__()
        self.encoder = encoder
        self.familiarity = familiarity
        self.generator = generator
        self.layer = layer
        self.hparams = hparams
        self.base_fingerprint = base_fingerprint  # of the model it was trained on (megedit.artifact.base_fingerprint)
        # what was edited ({case_id, prompt, subject, target_new} per edit) and, per gate key, the edit it is a view
        # of: lets a trace name the edits a query resembles (megedit.trace); None for edits saved before they existed
        self.edits = edits
        self.key_edit = key_edit
        # megedit.relation.RelationCheck or None: after the gate, a query naming an edited subject must ask its relation
        self.relation = relation

    def save_pretrained(self, directory, base_model: nn.Module | None = None):
        """Write the edit alone to ``directory`` (see ``megedit.artifact``); ``base_model`` if it has no fingerprint."""
        from .artifact import save_edit

        fingerprint = base_fingerprint(base_model, self.layer) if base_model is not None else self.base_fingerprint
        if fingerprint is None:
            raise ValueError("this edit does not know its base model: pass base_model= to save_pretrained")
        return save_edit(self, directory, fingerprint)

    @classmethod
    def from_pretrained(cls, directory, base_model: nn.Module | None = None, device: str | None = None,
                        strict: bool = True) -> "MeGEdit":
        """Load a saved edit; with ``base_model``, refuse it unless it was made for that model (``strict=False``:
        only its architecture and sizes must match)."""
        from .artifact import load_edit_parts

        return cls(**load_edit_parts(directory, base_model, device, strict))

    @torch.no_grad()
    def applies(self, texts: list[str], emb: torch.Tensor | None = None,
                settings: QuerySettings | None = None) -> torch.Tensor:
        """(B,) bool: which texts get the edit — the gate passes them and, with a relation check, they ask an edited
        subject's edited relation (or name no nearest edit's subject)."""
        settings = settings or QuerySettings()
        emb = embed(self.encoder, texts) if emb is None else emb  # (B, c)
        passed = self.familiarity.familiar(emb, epsilon=settings.epsilon, tau=settings.tau).cpu()
        rows = torch.nonzero(passed).squeeze(1)
        if self.relation is not None and self.key_edit is not None and len(rows):
            passed[rows] = self.relation.allows(self.encoder, [texts[i] for i in rows], emb[rows],
                                                self.familiarity.keys, torch.tensor(self.key_edit))
        return passed

    @torch.no_grad()
    def route(self, texts: list[str], settings: QuerySettings | None = None) -> NeuronBatch:
        """The runtime path: which texts touch an edit, and the neuron each of those gets."""
        settings = settings or QuerySettings()
        emb = embed(self.encoder, texts)  # (B, c)
        rows = torch.nonzero(self.applies(texts, emb, settings)).squeeze(1)  # (n,)
        if len(rows) == 0:
            return NeuronBatch(rows, emb.new_zeros(0, 0), len(texts))
        return NeuronBatch(rows, self.generator.sample(emb[rows], steps=settings.sample_steps), len(texts))  # (n, P)


class MeGModel(nn.Module):
    """A causal LM with a MeG edit: use it exactly like the model it wraps.

    ``sample_steps``, ``epsilon`` and ``tau`` (or ``settings``, a ``QuerySettings``) set how queries are answered;
    left out, the edit's own values apply. ``settings`` can be replaced later: ``edited.settings = QuerySettings(...)``.
    """

    def __init__(self, model: nn.Module, tokenizer, edit: MeGEdit, settings: QuerySettings | None = None, *,
                 sample_steps: int | None = None, epsilon: float | None = None, tau: float | None = None):
        super().__init__()
        given = {k: v for k, v in dict(sample_steps=sample_steps, epsilon=epsilon, tau=tau).items() if v is not None}
        if settings is not None and given:
            raise ValueError(f"pass either settings or {', '.join(given)}, not both")
        self.model = model
        self.edit = edit
        self.tokenizer = tokenizer
        self.settings = settings if settings is not None else QuerySettings(**given)
        inject_neuron(model, edit.layer)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)  # config, device, generation_config, ...

    def texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[str]:
        """Each row's text: the attended tokens only, so left and right padding route alike."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return [self.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
                for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> NeuronBatch:
        if input_ids is None:
            raise ValueError("MeG routes each sample from its tokens: pass input_ids (inputs_embeds alone cannot be routed)")
        return self.edit.route(self.texts(input_ids, attention_mask), self.settings)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        route = current_neurons()  # inside our own generate(): already decided at the prefill
        if route is None and past_key_values is not None:
            route = getattr(past_key_values, _ROUTE_ATTR, None)
            if route is None and past_key_values.get_seq_length() > 0:
                raise ValueError("this KV cache did not come from a MeGModel forward: its routing decision is unknown")
        if route is None:
            route = self.route(input_ids, attention_mask)
        with active_neurons(route):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                             **kwargs)
        if getattr(out, "past_key_values", None) is not None:
            setattr(out.past_key_values, _ROUTE_ATTR, route)
        return out

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Route once on the prompt, then generate with that decision for every new token."""
        with active_neurons(self.route(input_ids, attention_mask)):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, directory):
        """Save the edit alone (like a PEFT adapter), fingerprinted with the wrapped model."""
        return self.edit.save_pretrained(directory, base_model=self.model)

    @classmethod
    def from_pretrained(cls, model: nn.Module, tokenizer, directory, strict: bool = True,
                        settings: QuerySettings | None = None, *, sample_steps: int | None = None,
                        epsilon: float | None = None, tau: float | None = None) -> "MeGModel":
        """Put a saved edit on ``model``; refused when ``model`` is not the base model the edit was trained on.
        ``settings`` / ``sample_steps``, ``epsilon``, ``tau``: the query-time settings (see ``MeGModel``)."""
        edit = MeGEdit.from_pretrained(directory, base_model=model, strict=strict)
        remove_neuron(model)  # a neuron left by an earlier edit would fire alongside this one
        return cls(model, tokenizer, edit, settings, sample_steps=sample_steps, epsilon=epsilon, tau=tau)

    def unload(self) -> nn.Module:
        """Take the neuron out and return the original model, exactly as it was."""
        remove_neuron(self.model)
        return self.model
