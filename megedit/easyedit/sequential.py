"""Whether an edit stays on the model, in both EasyEdit APIs' terms, for the algorithms megedit provides.

The registry's wheel tells an apply function ``keep_original_weight=True`` when it will restore the weights (edits
stay when it is False). The GitHub API always passes False and restores after every edit unless ``sequential_edit``
is True, which its apply functions are not told: registration's wrappers hand it over with ``sequential_edits(...)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

_SEQUENTIAL: ContextVar[bool | None] = ContextVar("megedit_sequential_edits", default=None)


@contextmanager
def sequential_edits(keep: bool):
    """Inside the block, edits stay exactly when ``keep`` (GitHub EasyEdit's ``sequential_edit``)."""
    token = _SEQUENTIAL.set(bool(keep))
    try:
        yield
    finally:
        _SEQUENTIAL.reset(token)


def edits_stay(keep_original_weight: bool) -> bool:
    """True when EasyEdit will leave this edit on the model: ``sequential_edit`` where the GitHub API said it, else the
    wheel's ``not keep_original_weight``."""
    sequential = _SEQUENTIAL.get()
    return (not keep_original_weight) if sequential is None else sequential
