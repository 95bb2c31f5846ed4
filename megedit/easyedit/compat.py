"""Fixes that let the registry's 2023 wheel ``easyeditor==0.0.1.dev0`` run on CPU and on current transformers.

Nothing in the installed package is edited, and nothing stays changed outside an EasyEdit call:

- ``importing()`` is entered only around ``import easyeditor``;
- ``runtime()`` bundles the fixes needed while EasyEdit code runs (one context manager per fix in ``RUNTIME_FIXES``);
- ``wrap_editor()`` gives ``BaseEditor``'s entry points thin wrappers that run the original inside ``runtime()`` and
  correct what the original gets wrong about its arguments and results.

``megedit.easyedit.register()`` applies ``wrap_editor`` only when the wheel's API is detected. Code that calls the
wheel's functions directly (``compute_edit_quality``, ``apply_memit_to_model``) enters ``runtime()`` itself.
Each fix names the file:line of the wheel it answers (paths inside the installed ``easyeditor/`` package);
``tests/test_easyedit_compat.py`` shows each one is needed.
"""
from __future__ import annotations

import functools
import inspect
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import types
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from .loader import load_model_named, normalise_device
from .meg_adapter import TRAIN_ONCE_ALGS

_MISSING = object()


@contextmanager
def patched(owner, name: str, value):
    """Set ``owner.name = value`` for the block; afterwards restore it, or delete it if it was not set before.

    On a class only its own ``__dict__`` counts, so an inherited method (``torch.Tensor.to``) is restored by deletion.
    """
    before = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if before is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


def _module(name: str):
    # by import path: attribute access would hit trainer/models.py (`from .trainer import *` shadows easyeditor.models)
    return importlib.import_module(name)


# --------------------------------------------------------------------------------------------------- import time
def _find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    """Rows of a (n_heads * head_size) projection that survive pruning ``heads`` (gone from transformers 5)."""
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)
    heads = set(heads) - set(already_pruned_heads)
    for head in heads:
        shift = sum(1 for pruned in already_pruned_heads if pruned < head)  # indices move down past earlier prunes
        keep[head - shift] = False
    return heads, torch.arange(n_heads * head_size)[keep.view(-1)]


class _VisionStub(types.ModuleType):
    """Stands in for timm/torchvision, which only the wheel's multimodal (BLIP-2) code uses."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*args, **kwargs):
            raise ImportError(f"{self.__name__}.{attr} is not installed; EasyEdit's multimodal editors need it "
                              "(megedit only provides enough of it for `import easyeditor` to succeed)")

        return unavailable


class _VisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import timm`` / ``import torchvision`` only when the real package is absent and EasyEdit is asking."""

    ROOTS = ("timm", "torchvision")

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.ROOTS or not _imported_from_easyeditor():
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _VisionStub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _imported_from_easyeditor() -> bool:
    """True when the first frame outside importlib belongs to an easyeditor module (not transformers' probes)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("easyeditor")


@contextmanager
def moved_transformers_helpers():
    """trainer/blip2_models/Qformer.py:39-44 imports ``apply_chunking_to_forward``, ``prune_linear_layer`` and
    ``find_pruneable_heads_and_indices`` from ``transformers.modeling_utils``; they moved to
    ``transformers.pytorch_utils`` and the last one is gone in transformers 5. Only missing names are added."""
    from transformers import modeling_utils, pytorch_utils

    helpers = {"apply_chunking_to_forward": getattr(pytorch_utils, "apply_chunking_to_forward", None),
               "prune_linear_layer": getattr(pytorch_utils, "prune_linear_layer", None),
               "find_pruneable_heads_and_indices": getattr(pytorch_utils, "find_pruneable_heads_and_indices",
                                                           _find_pruneable_heads_and_indices)}
    with ExitStack() as stack:
        for name, value in helpers.items():
            if value is not None and not hasattr(modeling_utils, name):
                stack.enter_context(patched(modeling_utils, name, value))
        yield


@contextmanager
def vision_stubs():
    """trainer/blip2_models/common/dist_utils.py:14, common/utils.py:27, eva_vit.py:15-16 and
    dataset/processor/blip_processors.py:13-14 import timm/torchvision at module level, in the wheel and in the GitHub
    source alike (there eva_vit.py:16; its other import needs are the ``[easyedit-github]`` extra). PyPI's torchvision
    does not load beside the CPU torch wheel (``operator torchvision::nms does not exist``) and timm needs it; only
    EasyEdit's multimodal editors use either. A stub answers only imports made by easyeditor modules (transformers'
    own probes still see no torchvision), and leaves ``sys.modules`` afterwards."""
    finder = _VisionStubFinder()
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, _VisionStub)]:
            del sys.modules[name]


@contextmanager
def root_logger_kept():
    """editors/editor.py:25-27 calls ``logging.basicConfig`` at import: the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


IMPORT_FIXES = {"moved_helpers": moved_transformers_helpers, "vision_stubs": vision_stubs,
                "root_logger": root_logger_kept}


@contextmanager
def importing(skip: tuple[str, ...] = ()):
    """Everything ``import easyeditor`` needs (``IMPORT_FIXES`` but ``skip``), undone after the import."""
    with ExitStack() as stack:
        for name, fix in IMPORT_FIXES.items():
            if name not in skip:
                stack.enter_context(fix())
        yield


# ---------------------------------------------------------------------------------------------------- run time
def _fix_device(device):
    """``f"cuda:{hparams.device}"`` with device "cpu"/"mps"/"cuda:1" is no device; EasyEdit meant ``hparams.device``."""
    if isinstance(device, str) and device.startswith("cuda:") and not device[5:].isdigit():
        return normalise_device(device[5:])
    return device


def _device_fixing(fn, positional: bool):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if positional and len(args) > 1:
            args = (args[0], _fix_device(args[1]), *args[2:])
        if "device" in kwargs:
            kwargs["device"] = _fix_device(kwargs["device"])
        return fn(*args, **kwargs)

    return call


class _TorchWithDeviceFix(types.ModuleType):
    """``torch`` as seen by one EasyEdit module: constructors taking ``device=`` get it corrected, all else is torch."""

    def __init__(self):
        super().__init__("torch")
        self.tensor = _device_fixing(torch.tensor, positional=False)
        self.zeros = _device_fixing(torch.zeros, positional=False)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextmanager
def cuda_device_strings():
    """The wheel hard-codes ``f"cuda:{hparams.device}"``: editors/editor.py:105,273,366,430,687;
    memit/compute_z.py:39,57,60,84,86; memit/memit_main.py:50,133,284; rome/layer_stats.py:166;
    rome/compute_v.py:31,48,51,75,77; rome/compute_u.py:54; evaluate/evaluate_utils.py:16,50,58,88.

    Only device strings that are invalid anyway ("cuda:" + a non-number) are rewritten, so nothing else changes.
    ``.to(...)`` is fixed on ``torch.Tensor`` and ``torch.nn.Module`` for the block; ``torch.tensor``/``torch.zeros``
    (compute_z.py:60,84,86, compute_v.py:51,75,77) only inside those two modules, whose ``torch`` global is swapped
    (wrapping ``torch.tensor`` process-wide corrupts transformers' buffer initialisation).
    """
    proxy = _TorchWithDeviceFix()
    with ExitStack() as stack:
        for owner in (torch.Tensor, torch.nn.Module):
            stack.enter_context(patched(owner, "to", _device_fixing(owner.to, positional=True)))
        for name in ("easyeditor.models.memit.compute_z", "easyeditor.models.rome.compute_v"):
            stack.enter_context(patched(_module(name), "torch", proxy))
        yield


def _is_decoder_layer(root: torch.nn.Module, module: torch.nn.Module) -> bool:
    names = getattr(root, "_no_split_modules", None) or ()
    return type(module).__name__ in set(names)


@contextmanager
def decoder_layer_tuples():
    """memit/compute_z.py:100,104,142 index ``output[0]`` of a traced decoder layer; GPT-2 (transformers 5) and Llama
    (4.57+) layers return a bare tensor. Inside this block a ``nethook.Trace`` on a decoder layer shows EasyEdit a
    1-tuple (and hands the model back the tensor); traces on any other module are untouched.
    """
    nethook = _module("easyeditor.util.nethook")
    original = nethook.Trace.__init__

    @functools.wraps(original)
    def __init__(self, module, layer=None, *args, **kwargs):
        original(self, module, layer, *args, **kwargs)
        target = nethook.get_module(module, layer) if layer is not None else module
        if not _is_decoder_layer(module, target):
            return
        hooks = target._forward_hooks
        inner = hooks[self.registered_hook.id]

        def as_tuple(m, inputs, output):
            if not isinstance(output, torch.Tensor):
                return inner(m, inputs, output)
            result = inner(m, inputs, (output,))
            return result[0] if isinstance(result, tuple) else result

        hooks[self.registered_hook.id] = as_tuple

    with patched(nethook.Trace, "__init__", __init__):
        yield


class StatsMissing(FileNotFoundError):
    """EasyEdit needs a covariance file that is not on disk (megedit never lets it download Wikipedia)."""


@contextmanager
def stats_never_download():
    """rome/layer_stats.py:102 downloads Wikipedia with ``load_dataset`` when a covariance file is missing. Inside this
    block the wheel's ``layer_stats`` (as memit_main.py:269 and rome/compute_u.py use it) first checks the file and
    raises ``StatsMissing`` naming it and the command that writes it; ``load_dataset`` itself is disabled too.
    """
    from ..stats import easyedit_stats_path

    layer_stats_module = _module("easyeditor.models.rome.layer_stats")
    original = layer_stats_module.layer_stats

    @functools.wraps(original)
    def layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=None, sample_size=None,
                    precision=None, *args, **kwargs):
        folder = model_name if model_name is not None else model.config._name_or_path.replace("/", "_")
        path = easyedit_stats_path(stats_dir, folder, ds_name, layer_name, precision or "float64", sample_size,
                                   to_collect)
        if not path.exists() or (sample_size is not None and int(np.load(path)["sample_size"]) != sample_size):
            raise StatsMissing(_missing_message(path, ds_name, sample_size))
        return original(model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name, sample_size,
                        precision, *args, **kwargs)

    def load_dataset(*args, **kwargs):
        raise StatsMissing(f"EasyEdit tried to download {args[:2]} for covariance statistics; megedit never lets it. "
                           "Precompute them with `megedit stats <hparams.yaml>`.")

    with ExitStack() as stack:
        stack.enter_context(patched(layer_stats_module, "load_dataset", load_dataset))
        for user in ("easyeditor.models.memit.memit_main", "easyeditor.models.rome.compute_u"):
            stack.enter_context(patched(_module(user), "layer_stats", layer_stats))
        yield


def _missing_message(path: Path, ds_name: str, sample_size) -> str:
    return (f"covariance statistics {str(path)!r} are missing (or hold a different sample_size than "
            f"mom2_n_samples={sample_size}); EasyEdit would download {ds_name!r} from the Hub. Write them from local "
            "text with `megedit stats <hparams.yaml>` (see megedit/stats.py).")


@contextmanager
def no_log_files():
    """editors/editor.py:32-36,57: every BaseEditor adds a file handler writing ./logs/run.log and a stream handler to
    the module logger (n editors print every line n times). Inside this block ``make_logs`` adds nothing."""
    with patched(_module("easyeditor.editors.editor"), "make_logs", lambda: None):
        yield


RUNTIME_FIXES = {"device": cuda_device_strings, "decoder_tuples": decoder_layer_tuples,
                 "no_download": stats_never_download, "log_files": no_log_files}
_lock = threading.Lock()
_active = {"count": 0, "stack": None}


@contextmanager
def runtime(skip: tuple[str, ...] = ()):
    """All runtime fixes for the block; ``skip`` names fixes to leave out.

    The patches are process-wide while any block is open (they only rewrite things that fail without them), so the
    blocks are counted: the first one applies them, the last one to close removes them, and a block opened inside
    another (or in another thread meanwhile) changes nothing, its ``skip`` included.
    """
    unknown = set(skip) - set(RUNTIME_FIXES)
    if unknown:
        raise ValueError(f"unknown fix(es) {sorted(unknown)}; known: {sorted(RUNTIME_FIXES)}")
    with _lock:
        if _active["count"] == 0:
            stack = ExitStack()
            try:
                for name, fix in RUNTIME_FIXES.items():
                    if name not in skip:
                        stack.enter_context(fix())
            except BaseException:
                stack.close()
                raise
            _active["stack"] = stack
        _active["count"] += 1
    try:
        yield
    finally:
        with _lock:
            _active["count"] -= 1
            if _active["count"] == 0:
                _active["stack"].close()
                _active["stack"] = None


# -------------------------------------------------------------------------------------- BaseEditor entry points
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
        before = getattr(self.hparams, "batch_size", _MISSING)
        try:
            with runtime():
                return original(self, *args, **kwargs)
        finally:
            if before is not _MISSING:
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


def locality_inputs(locality_prompts, locality_ground_truth, n: int) -> dict | None:
    """The documented batch_edit arguments (lists) as EasyEdit's ``locality_inputs`` dict; a dict passes through."""
    if locality_prompts is None:
        return None
    if isinstance(locality_prompts, dict):
        if locality_ground_truth is not None:
            raise ValueError("locality_prompts is a locality_inputs dict; pass the answers inside it, not as "
                             "locality_ground_truth")
        return locality_prompts
    prompts = [locality_prompts] if isinstance(locality_prompts, str) else list(locality_prompts)
    answers = [locality_ground_truth] if isinstance(locality_ground_truth, str) else list(locality_ground_truth or [])
    if len(prompts) != n or len(answers) != n:
        raise ValueError(f"locality_prompts ({len(prompts)}) and locality_ground_truth ({len(answers)}) need one "
                         f"entry per edit ({n})")
    return {"neighborhood": {"prompt": prompts, "ground_truth": answers}}


def _slice_locality(locality: dict | None, sl: slice) -> dict | None:
    if locality is None:
        return None
    out = {}
    for key, item in locality.items():
        prompts, answers = item["prompt"], item["ground_truth"]
        if isinstance(prompts, str):
            prompts, answers = [prompts], [answers]
        out[key] = {"prompt": list(prompts)[sl], "ground_truth": list(answers)[sl]}
    return out


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
        evaluate = _module("easyeditor.editors.editor").compute_edit_quality
        all_metrics, edited_model, weights_copy = [], self.model, {}
        with runtime():
            for start in range(0, n, size):
                sl = slice(start, start + size)
                part = dict(ground_truth=_part(ground_truth, sl), rephrase_prompts=_part(rephrase_prompts, sl),
                            locality_prompts=_slice_locality(locality, sl),
                            **{k: _part(v, sl) if k == "subject" else v for k, v in kwargs.items()})
                pre = None
                if not keep_original_weight:
                    requests = self._prepare_requests(prompts[sl], target_new[sl], part["ground_truth"] or
                                                      ["<|endoftext|>"] * len(prompts[sl]), part["rephrase_prompts"],
                                                      _slice_locality(locality, sl), None,
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


def check_eval_lengths(tok, max_length: int, prompts, target_new, rephrase_prompts=None, locality=None,
                       case_ids=None) -> None:
    """EasyEdit's teacher-forced metrics (evaluate_utils.test_prediction_acc) tokenize ``prompt + ' ' + answer`` with
    ``truncation=True, max_length=hparams.max_length``: a longer pair is scored on a cut-off answer, and a prompt
    that fills ``max_length`` on its own leaves no answer and stops the whole call with an IndexError, after the
    editing work is done. Refuse such requests up front."""
    if not max_length or tok is None:
        return
    as_list = (lambda v: [v] if isinstance(v, str) else list(v or []))
    targets = as_list(target_new)
    pairs = [("prompt", i, p, targets[i]) for i, p in enumerate(as_list(prompts))]
    pairs += [("rephrase prompt", i, p, targets[i]) for i, p in enumerate(as_list(rephrase_prompts)) if p]
    for key, item in (locality or {}).items():
        pairs += [(f"locality prompt ({key})", i, p, a if isinstance(a, str) else str(a))
                  for i, (p, a) in enumerate(zip(as_list(item["prompt"]), as_list(item["ground_truth"]))) if p]
    lengths = [len(ids) for ids in tok([f"{p} {a}" for _, _, p, a in pairs])["input_ids"]] if pairs else []
    too_long = [(n, what, i, prompt) for n, (what, i, prompt, _) in zip(lengths, pairs) if n > max_length]
    if too_long:
        where = "; ".join(f"{f'case {case_ids[i]}' if case_ids is not None else f'edit {i}'}: {what} + answer is "
                          f"{n} tokens ({prompt[:60]!r})" for n, what, i, prompt in too_long[:5])
        raise ValueError(f"{len(too_long)} evaluation text(s) are longer than hparams.max_length={max_length}, which "
                         "EasyEdit's evaluation truncates them to (a prompt that fills it stops the run with an "
                         f"IndexError): set max_length to at least {max(lengths)}. {where}")


def _part(values, sl: slice):
    if values is None:
        return None
    return ([values] if isinstance(values, str) else list(values))[sl]


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
