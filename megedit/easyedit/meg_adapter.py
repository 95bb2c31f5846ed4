"""MeG as an EasyEdit algorithm (``ALG_DICT["MeG"]``).

EasyEdit calls ``apply_algo(model, tok, requests, hparams, copy, return_orig_weights, keep_original_weight, ...)`` once
per request (``edit``) or once per chunk (``batch_edit``). MeG learns one artifact for a whole set of edits, so:

- ``batch_edit`` gives MeG all its requests in one chunk (``TRAIN_ONCE_ALGS``; see the wrappers in this package);
- edits that EasyEdit keeps on the model accumulate: the next call retrains on every kept request plus the new ones
  (a new target for an already edited prompt replaces the old one). The wheel keeps edits when called with
  ``keep_original_weight=False``; the GitHub API always passes False and keeps edits when ``sequential_edit=True``
  (``sequential.edits_stay``);
- restoring needs nothing: MeG changes no weight. Its neuron is a hook that is inert outside the returned
  ``MeGModel``, so EasyEdit's base model answers as before, and restoring the returned ``weights_copy`` (copies of
  the hooked MLP's parameters) writes back the values that are already there.
"""
from __future__ import annotations

import weakref

from ..meg_main import apply_meg_to_model
from ..model import MeGModel
from .sequential import edits_stay, sequential_edits  # noqa: F401  (sequential_edits: re-exported)

TRAIN_ONCE_ALGS = {"MeG"}
_KEPT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # base model -> requests its MeG edit holds


def kept_requests(model) -> list[dict]:
    """The requests that the MeG edit now on ``model`` (a base model or a MeGModel) was trained on."""
    base = model.model if isinstance(model, MeGModel) else model
    return list(_KEPT.get(base, []))


def merge_requests(kept: list[dict], new: list[dict]) -> list[dict]:
    """``kept`` then ``new``, one request per prompt; a later request for a prompt replaces the earlier one."""
    by_prompt: dict[str, dict] = {}
    for request in [*kept, *new]:
        by_prompt.pop(request["prompt"], None)
        by_prompt[request["prompt"]] = request
    return list(by_prompt.values())


def apply_meg_easyedit(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                       keep_original_weight=False, **kwargs):
    """EasyEdit's ``apply_algo`` for MeG: ``(edited MeGModel, weights_copy)``."""
    base = model.model if isinstance(model, MeGModel) else model
    accumulate = edits_stay(keep_original_weight)
    train_on = merge_requests(_KEPT.get(base, []) if accumulate else [], list(requests))
    edited, weights_copy = apply_meg_to_model(base, tok, train_on, hparams, copy=copy,
                                              return_orig_weights=return_orig_weights,
                                              keep_original_weight=keep_original_weight, **kwargs)
    _KEPT[edited.model] = train_on if accumulate else []
    return edited, weights_copy
