"""MeG (and megedit's AlphaEdit) as EasyEdit algorithms.

    from megedit.easyedit import register
    register()                                  # once per process; calling it again changes nothing
    from easyeditor import BaseEditor
    editor = BaseEditor.from_hparams(MeGHyperParams.from_hparams("hparams/MeG/smollm2-135m.yaml"))
    metrics, edited_model, _ = editor.batch_edit(prompts, target_new, ...)

``register()`` imports the installed EasyEdit, tells which API it has by the signature of ``BaseEditor.edit`` (the
registry's 2023 wheel takes ``keep_original_weight``; the GitHub API of 2024+ takes ``sequential_edit``), and adds:

- ``ALG_DICT["MeG"]`` (``meg_adapter.apply_meg_easyedit``) and, where EasyEdit has no AlphaEdit of its own,
  ``ALG_DICT["AlphaEdit"]`` (``megedit.baselines.alphaedit``); on the GitHub API, EasyEdit's AlphaEdit where it can
  handle the model, else megedit's (``alphaedit_choice``); both count as batchable for ``batch_edit``;
- ``batch_edit`` trains MeG once on all its requests (MeG learns one artifact for a set of edits);
- on the wheel only: the fixes of ``compat`` (``wheel_editor``) around every ``BaseEditor`` call (CPU devices, current transformers,
  model loading for builtin names / GGUF files, batch_edit's metrics, no statistics downloads);
- on the GitHub API: builtin model names and GGUF files load through megedit, a loaded ``(model, tokenizer)`` gets
  a name string for EasyEdit's evaluators, and ``sequential_edit`` reaches MeG and megedit's AlphaEdit (its apply
  functions are not told), so that they keep earlier edits exactly when EasyEdit does.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path

from ..yaml_file import read_yaml_mapping
from .api import detect_api, import_easyeditor
from .loader import load_model_named, normalise_device
from .alphaedit_choice import choosing, easyedit_cannot
from .meg_adapter import TRAIN_ONCE_ALGS, apply_meg_easyedit, kept_requests
from .sequential import sequential_edits

BATCHABLE_ALGS = {"MeG", "AlphaEdit"}
SEQUENTIAL_AWARE_ALGS = {"MeG", "AlphaEdit"}  # told GitHub's sequential_edit (megedit's code reads it; EasyEdit's not)
_state: dict = {}


def register() -> str:
    """Register MeG (and AlphaEdit where missing) with the installed EasyEdit; returns the detected API. Idempotent."""
    if _state.get("api"):
        return _state["api"]
    api = detect_api()
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    editor_module = importlib.import_module("easyeditor.editors.editor")
    alg_dict["MeG"] = apply_meg_easyedit
    from ..baselines.alphaedit import apply_alphaedit_to_model

    if "AlphaEdit" not in alg_dict:
        alg_dict["AlphaEdit"] = apply_alphaedit_to_model
        _state["own_alphaedit"] = True
    elif api == "github" and not getattr(alg_dict["AlphaEdit"], "__megedit__", False):
        alg_dict["AlphaEdit"] = choosing(alg_dict["AlphaEdit"], apply_alphaedit_to_model)
    _allow_batching(importlib.import_module("easyeditor.editors.batch_editor").BatchEditor)
    if api == "wheel":
        from .wheel_editor import wrap_editor

        wrap_editor(editor_module.BaseEditor)
    else:
        _wrap_github(editor_module.BaseEditor)
    _state["api"] = api
    return api


def _allow_batching(batch_editor) -> None:
    original = batch_editor.__dict__["is_batchable_method"]
    check = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(check, "__megedit__", False):
        return

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in BATCHABLE_ALGS or check(alg_name)

    is_batchable_method.__megedit__ = True
    setattr(batch_editor, "is_batchable_method", staticmethod(is_batchable_method))


def _wrap_github(editor_cls) -> None:
    """The GitHub API needs four things: megedit's model names, a name string for a loaded model, ``sequential_edit``
    handed to MeG and megedit's AlphaEdit, and MeG's single training per batch_edit."""
    if getattr(editor_cls.__init__, "__megedit__", False):
        return
    for name in ("edit", "edit_requests", "batch_edit"):
        if name in editor_cls.__dict__:
            wrapped = _passing_sequential_edit(editor_cls.__dict__[name], one_chunk=name == "batch_edit")
            setattr(editor_cls, name, wrapped)
    editor_cls.__init__ = _loading_megedit_names(editor_cls.__init__)


def _passing_sequential_edit(original, one_chunk: bool):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        if self.alg_name not in SEQUENTIAL_AWARE_ALGS:
            return original(self, *args, **kwargs)
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        before = self.hparams.batch_size
        if one_chunk and self.alg_name in TRAIN_ONCE_ALGS:
            prompts = bound.get("prompts") or []
            self.hparams.batch_size = max(1, len(prompts))
        try:
            with sequential_edits(bound.get("sequential_edit", False)):
                return original(self, *args, **kwargs)
        finally:
            self.hparams.batch_size = before

    call.__megedit__ = True
    return call


def _loading_megedit_names(original_init):
    """Builtin names (``smollm2-135m``) and ``.gguf`` files, which EasyEdit's loader does not know, load through
    megedit and reach EasyEdit as the ``(model, tokenizer)`` pair it accepts in place of a name. For a pair passed in
    by the caller, ``editor.model_name`` becomes a string: evaluate/evaluate.py:147,158 call ``.lower()`` on it."""
    from ..loading import BUILTIN_LLMS

    @functools.wraps(original_init)
    def __init__(self, hparams):
        name = hparams.model_name
        if not isinstance(name, str):
            original_init(self, hparams)
            self.model_name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
            return
        if not (name.lower() in BUILTIN_LLMS or name.lower().endswith(".gguf")):
            return original_init(self, hparams)
        hparams.model_name = load_model_named(name, device=normalise_device(getattr(hparams, "device", None)))
        try:
            original_init(self, hparams)
        finally:
            hparams.model_name = name
        self.model_name = name

    __init__.__megedit__ = True
    return __init__


# ----------------------------------------------------------------------------------------------- hparams files
_EASYEDIT_HPARAMS = {"ROME": "ROMEHyperParams", "MEMIT": "MEMITHyperParams", "FT": "FTHyperParams",
                     "KN": "KNHyperParams", "LoRA": "LoRAHyperParams", "AlphaEdit": "AlphaEditHyperParams",
                     "EMMET": "EMMETHyperParams", "PMET": "PMETHyperParams", "R-ROME": "R_ROMEHyperParams"}


def implementation(hparams) -> dict:
    """Which code edits for ``hparams`` on the registered EasyEdit: ``{"code": module, "why": reason or None}``."""
    register()
    if hparams.alg_name == "MeG":
        return {"code": "megedit", "why": None}
    if hparams.alg_name == "AlphaEdit":
        if _state.get("own_alphaedit"):
            return {"code": "megedit.baselines.alphaedit", "why": "the installed EasyEdit has no AlphaEdit"}
        why = easyedit_cannot(hparams) if _state["api"] == "github" else None
        return {"code": "megedit.baselines.alphaedit" if why else "easyeditor.models.alphaedit", "why": why}
    apply = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT[hparams.alg_name]
    return {"code": apply.__module__, "why": None}


def hparams_class(alg_name: str):
    """The hparams class for ``alg_name``: MeG's, megedit's AlphaEdit where EasyEdit has none, else EasyEdit's."""
    if alg_name == "MeG":
        from ..hparams import MeGHyperParams

        return MeGHyperParams
    register()
    if alg_name == "AlphaEdit" and _state.get("own_alphaedit"):
        from ..baselines.alphaedit import AlphaEditHyperParams

        return AlphaEditHyperParams
    cls = getattr(import_easyeditor(), _EASYEDIT_HPARAMS.get(alg_name, f"{alg_name}HyperParams"), None)
    if cls is None:
        raise ValueError(f"no hyperparameter class for alg_name {alg_name!r} in the installed EasyEdit")
    return cls


def load_hparams(path: str | Path):
    """Read any algorithm's hparams YAML (the class is chosen by its ``alg_name``)."""
    p = Path(path)
    config = read_yaml_mapping(p, "hparams file")
    if "alg_name" not in config:
        raise ValueError(f"{p} must have an 'alg_name' key")
    cls = hparams_class(config["alg_name"])
    try:
        return cls.from_hparams(str(p))
    except TypeError as e:  # EasyEdit's dataclasses report unknown/missing keys this way
        raise ValueError(f"{p}: {e}") from None


__all__ = ["register", "detect_api", "import_easyeditor", "load_hparams", "hparams_class", "load_model_named",
           "implementation", "kept_requests", "sequential_edits", "BATCHABLE_ALGS", "TRAIN_ONCE_ALGS"]
