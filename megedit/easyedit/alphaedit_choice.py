"""Which AlphaEdit edits on GitHub EasyEdit: its own where it can handle the model, else megedit's.

GitHub EasyEdit's ``easyeditor/models/alphaedit/AlphaEdit_main.py`` (commit 14cea82):
- :64-71 builds the projection ``P`` only when ``hparams.model_name`` contains llama, qwen, gpt-j-6b or gpt2-xl
  (``NameError: name 'P' is not defined`` at :74 otherwise), and :85-88 its key cache only for llama, qwen or gpt2-xl
  (``NameError`` on ``cache_c`` for gpt-j-6b); a loaded ``(model, tokenizer)`` as model_name has no ``.lower()``;
- :75 saves a freshly computed ``P`` to ``./null_space_project.pt`` in the working directory whatever ``P_loc`` says.
Where one of these applies, megedit's AlphaEdit (``megedit/baselines/alphaedit``, the same update on the same MEMIT
code and the same hparams keys) edits instead; ``implementation`` says which ran and why, for every result.
The registry's 2023 wheel has no AlphaEdit: megedit's is registered there.
"""
from __future__ import annotations

from pathlib import Path

MODELS_IT_HANDLES = ("llama", "qwen", "gpt2-xl")
WHERE_IT_WRITES_P = "null_space_project.pt"  # relative to the working directory


def easyedit_cannot(hparams) -> str | None:
    """Why GitHub EasyEdit's AlphaEdit cannot edit with ``hparams`` (None: it can)."""
    name = hparams.model_name
    if not isinstance(name, str):
        return "model_name is a loaded model; EasyEdit's AlphaEdit sizes its projection from the model's name"
    if not any(key in name.lower() for key in MODELS_IT_HANDLES):
        return (f"EasyEdit's AlphaEdit builds its projection only for model names containing "
                f"{', '.join(MODELS_IT_HANDLES)}; model_name is {name!r}")
    p_loc = getattr(hparams, "P_loc", None)
    if not p_loc or (not Path(p_loc).exists() and Path(p_loc).resolve() != Path(WHERE_IT_WRITES_P).resolve()):
        return (f"EasyEdit's AlphaEdit would write its projection to ./{WHERE_IT_WRITES_P} in the working directory, "
                f"not to P_loc={p_loc!r}")
    return None


def choosing(easyedit_apply, megedit_apply):
    """``ALG_DICT["AlphaEdit"]`` for the GitHub API: EasyEdit's where it can, else megedit's (same signature)."""

    def apply_alphaedit(model, tok, requests, hparams, **kwargs):
        apply = easyedit_apply if easyedit_cannot(hparams) is None else megedit_apply
        return apply(model, tok, requests, hparams, **kwargs)

    apply_alphaedit.easyedit_apply = easyedit_apply
    apply_alphaedit.__megedit__ = True
    return apply_alphaedit
