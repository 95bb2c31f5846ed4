"""megedit: MeG (Massive editing for LLMs via dynamic weight Generation) as an EasyEdit-style editor.

Names are imported on first use, so ``import megedit`` (and ``megedit --help``) stays fast.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "MeGHyperParams": "hparams", "HParamsError": "hparams",
    "apply_meg_to_model": "meg_main", "train_meg": "meg_main",
    "load_model": "loading", "load_encoder": "loading",
    "load_requests": "data", "validate_requests": "data", "make_requests": "data",
    "evaluate_requests": "evaluate", "locality_reference": "evaluate",
    "MeGEdit": "model", "MeGModel": "model", "QuerySettings": "model",
    "trace_query": "trace",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'megedit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
