"""The wheel's ``BaseEditor`` entry points, wrapped (``wrap_editor``): each runs the original inside
``compat.runtime()`` and corrects what the original gets wrong about its arguments and results.

``megedit.easyedit.register()`` applies ``wrap_editor`` only when the wheel's API is detected. Each wrapper names the
file:line of the wheel it answers (paths inside the installed ``easyeditor/`` package).
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

from .compat import runtime
from .import_fixes import MISSING, easyeditor_module
from .loader import load_model_named, normalise_device
from .meg_adapter import TRAIN_ONCE_ALGS
from .requests import check_eval_lengths, locality_inputs, slice_locality, sliced


def _init(original):
    """editors/editor.py:61-89 picks classes by a substring of model_name: unknown names raise NotImplementedError,
    "llama" gets the sentencepiece LlamaTokenizer (SmolLM2 has a BPE one), "gpt" the slow GPT2Tokenizer. The model is
    loaded by megedit instead (builtin names, hub ids, folders, .gguf files) and handed to the wheel's (model, tok)
    branch (:94-95); ``editor.model_name`` stays the string that evaluate.py:100,120 calls ``.lower()`` on."""

    @functools.wraps(original)
    def __init__(self, hparams):
        name = hparams.model_name
        with runtime():
            if not isinstance(name, str):
                original(self, hparams)
                self.model_name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
                return
            device = None if hparams.model_parallel else normalise_device(getattr(hparams, "device", None))
            hparams.model_name = load_model_named(name, device=device)
            try:
                original(self, hparams)
            finally:
                hparams.model_name = name
            self.model_name = name

    return __init__


def _single_edits(original):
    """editors/editor.py:134 and :563 set ``hparams.batch_size = 1`` for good; it is put back after the call."""

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        before = getattr(self.hparams, "batch_size", MISSING)
        try:
            with runtime():
                return original(self, *args, **kwargs)
        finally:
            if before is not MISSING:
                self.hparams.batch_size = before

    return call


def _edit(original):
    """``edit``: ``_single_edits``, after the up-front length check that ``batch_edit`` does too."""
    inner, signature = _single_edits(original), inspect.signature(original)

    @functools.wraps(original)
    def edit(self, *args, **kwargs):
        given = signature.bind_partial(self, *args, **kwargs).arguments
        check_eval_lengths(self.tok, getattr(self.hparams, "max_length", None), given.get("prompts"),
                           given.get("target_new"), given.get("rephrase_prompts"), given.get("locality_inputs"))
        return inner(self, *args, **kwargs)

    return edit


def _in_runtime(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
        with runtime():
            return original(self, *args, **kwargs)

    return call


def locality_accuracy(metrics: dict) -> dict:
    """Turn the pre/post locality token outputs into ``{key}_acc`` the way editors/editor.py:274-283 does for edit();
    batch_edit (:299-378) never does it."""
    post, pre = metrics.get("post", {}).get("locality", {}), metrics.get("pre", {}).get("locality", {})
    for key in [k[: -len("_output")] for k in list(post) if k.endswith("_output")]:
        if f"{key}_output" in pre:
            post[f"{key}_acc"] = [float(np.mean(np.equal(a, b)))
                                  for a, b in zip(post.pop(f"{key}_output"), pre[f"{key}_output"])]
    if "locality" in metrics.get("pre", {}) and not any(k.endswith("_output") for k in post):
        metrics["pre"].pop("locality")
    return metrics


def _batch_edit(original):
    """editors/editor.py:299-378, ``batch_edit``:
    - :330-331 passes locality_prompts/locality_ground_truth into the locality_inputs/portability_inputs slots of
      ``_prepare_requests``: lists are turned into the ``{"neighborhood": {...}}`` dict it expects;
    - :352 resets ``all_metrics`` inside the chunk loop (only the last chunk came back) and :356 numbers cases within
      a chunk: chunks are run one by one here and their metrics joined, numbered across the whole call;
    - :364-369 with ``keep_original_weight=False`` restores from an empty weights_copy, so "pre" is measured on the
      edited model: "pre" is measured here before the edit instead;
    - locality outputs become accuracies (``locality_accuracy``);
    - MeG trains once on all requests (``TRAIN_ONCE_ALGS``), whatever ``batch_size`` says.
    """

    @functools.wraps(original)
    def batch_edit(self, prompts, target_new, ground_truth=None, rephrase_prompts=None, locality_prompts=None,
                   locality_ground_truth=None, keep_original_weight=False, verbose=True, **kwargs):
        n = len(prompts)
        if n == 0 or len(target_new) != n:
            raise ValueError(f"batch_edit needs as many target_new ({len(target_new)}) as prompts ({n}), at least one")
        locality = locality_inputs(locality_prompts, locality_ground_truth, n)
        check_eval_lengths(self.tok, getattr(self.hparams, "max_length", None), prompts, target_new,
                           rephrase_prompts, locality)
        size = n if self.alg_name in TRAIN_ONCE_ALGS else max(1, int(self.hparams.batch_size))
        evaluate = easyeditor_module("easyeditor.editors.editor").compute_edit_quality
        all_metrics, edited_model, weights_copy = [], self.model, {}
        with runtime():
            for start in range(0, n, size):
                sl = slice(start, start + size)
                part = dict(ground_truth=sliced(ground_truth, sl), rephrase_prompts=sliced(rephrase_prompts, sl),
                            locality_prompts=slice_locality(locality, sl),
                            **{k: sliced(v, sl) if k == "subject" else v for k, v in kwargs.items()})
                pre = None
                if not keep_original_weight:
                    requests = self._prepare_requests(prompts[sl], target_new[sl], part["ground_truth"] or
                                                      ["<|endoftext|>"] * len(prompts[sl]), part["rephrase_prompts"],
                                                      slice_locality(locality, sl), None,
                                                      **({"subject": part["subject"]} if "subject" in part else {}))
                    pre = [evaluate(self.model, self.model_name, self.hparams, self.tok, r, self.hparams.device,
                                    test_generation=kwargs.get("test_generation", False)) for r in requests]
                before = self.hparams.batch_size
                self.hparams.batch_size = len(prompts[sl])
                try:
                    metrics, edited_model, weights_copy = original(
                        self, prompts[sl], target_new[sl], locality_ground_truth=None,
                        keep_original_weight=keep_original_weight, verbose=verbose, **part)
                finally:
                    self.hparams.batch_size = before
                for i, m in enumerate(metrics):
                    m["case_id"] = start + i
                    if pre is not None:
                        m["pre"] = pre[i]
                    all_metrics.append(locality_accuracy(m))
        return all_metrics, edited_model, weights_copy

    return batch_edit


def wrap_editor(editor_cls) -> None:
    """Give the wheel's BaseEditor its fixed entry points (once; the originals stay reachable as ``__wrapped__``)."""
    wrappers = {"__init__": _init, "edit": _edit, "edit_requests": _single_edits, "batch_edit": _batch_edit,
                "edit_dataset": _in_runtime}
    for name, wrap in wrappers.items():
        method = editor_cls.__dict__.get(name)
        if method is not None and not getattr(method, "__megedit_compat__", False):
            wrapped = wrap(method)
            wrapped.__megedit_compat__ = True
            setattr(editor_cls, name, wrapped)
