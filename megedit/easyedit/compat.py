"""Fixes that let the registry's 2023 wheel ``easyeditor==0.0.1.dev0`` run on CPU and on current transformers.

Nothing in the installed package is edited, and nothing stays changed outside an EasyEdit call:

- ``import_fixes.importing()`` is entered only around ``import easyeditor``;
- ``runtime()`` (here) bundles the fixes needed while EasyEdit code runs (one context manager per fix in
  ``RUNTIME_FIXES``);
- ``wheel_editor.wrap_editor()`` gives ``BaseEditor``'s entry points thin wrappers that run the original inside
  ``runtime()`` and correct what the original gets wrong about its arguments and results.

``megedit.easyedit.register()`` applies ``wrap_editor`` only when the wheel's API is detected. Code that calls the
wheel's functions directly (``compute_edit_quality``, ``apply_memit_to_model``) enters ``runtime()`` itself.
Each fix names the file:line of the wheel it answers (paths inside the installed ``easyeditor/`` package);
``tests/test_easyedit_compat.py`` shows each one is needed.
"""
from __future__ import annotations

import functools
import threading
import types
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from .import_fixes import easyeditor_module, patched
from .loader import normalise_device


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
            stack.enter_context(patched(easyeditor_module(name), "torch", proxy))
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
    nethook = easyeditor_module("easyeditor.util.nethook")
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

    layer_stats_module = easyeditor_module("easyeditor.models.rome.layer_stats")
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
            stack.enter_context(patched(easyeditor_module(user), "layer_stats", layer_stats))
        yield


def _missing_message(path: Path, ds_name: str, sample_size) -> str:
    return (f"covariance statistics {str(path)!r} are missing (or hold a different sample_size than "
            f"mom2_n_samples={sample_size}); EasyEdit would download {ds_name!r} from the Hub. Write them from local "
            "text with `megedit stats <hparams.yaml>` (see megedit/stats.py).")


@contextmanager
def no_log_files():
    """editors/editor.py:32-36,57: every BaseEditor adds a file handler writing ./logs/run.log and a stream handler to
    the module logger (n editors print every line n times). Inside this block ``make_logs`` adds nothing."""
    with patched(easyeditor_module("easyeditor.editors.editor"), "make_logs", lambda: None):
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
