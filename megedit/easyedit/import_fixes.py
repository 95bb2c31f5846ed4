"""What ``import easyeditor`` needs on current libraries, and the patching helper every EasyEdit fix uses.

``importing()`` is entered only around ``import easyeditor`` (``megedit.easyedit.api.import_easyeditor``); each fix
adds only what is missing and is undone after the import. Each fix names the file:line of EasyEdit it answers;
``tests/test_easyedit_compat.py`` shows each one is needed.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from contextlib import ExitStack, contextmanager

import torch

MISSING = object()


@contextmanager
def patched(owner, name: str, value):
    """Set ``owner.name = value`` for the block; afterwards restore it, or delete it if it was not set before.

    On a class only its own ``__dict__`` counts, so an inherited method (``torch.Tensor.to``) is restored by deletion.
    """
    before = owner.__dict__.get(name, MISSING) if isinstance(owner, type) else getattr(owner, name, MISSING)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if before is MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


def easyeditor_module(name: str):
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
