"""Which EasyEdit is installed: import it (with the import-time fixes) and tell its API apart.

Kept apart from ``register()`` (``megedit.easyedit``) so that code EasyEdit runs, megedit's AlphaEdit among it, can ask
which API it runs on without importing the module that registers it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect


def import_easyeditor():
    """Import EasyEdit with the import-time shims (each adds only what is missing and is undone after the import)."""
    from .import_fixes import importing

    if importlib.util.find_spec("easyeditor") is None:
        raise ImportError("EasyEdit is not installed: `pip install --no-deps easyeditor==0.0.1.dev0` plus its import "
                          "dependencies (see the README), or install EasyEdit from GitHub")
    with importing():
        return importlib.import_module("easyeditor")


def detect_api() -> str:
    """"wheel" (``edit(..., keep_original_weight=...)``) or "github" (``edit(..., sequential_edit=...)``)."""
    import_easyeditor()
    editor = importlib.import_module("easyeditor.editors.editor")
    params = inspect.signature(editor.BaseEditor.edit).parameters
    if "sequential_edit" in params:
        return "github"
    if "keep_original_weight" in params:
        return "wheel"
    raise RuntimeError(f"unrecognised EasyEdit API: BaseEditor.edit{inspect.signature(editor.BaseEditor.edit)}")


@functools.cache
def installed_api() -> str:
    """``detect_api()``, once per process (the installed package does not change while it runs)."""
    return detect_api()
