"""AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", ICLR 2025),
built on the installed EasyEdit's MEMIT machinery; registered as ``ALG_DICT["AlphaEdit"]`` where EasyEdit has none."""
from .alphaedit_hparams import AlphaEditHyperParams
from .alphaedit_main import alphaedit_update, apply_alphaedit_to_model, null_space_projector, reset_alphaedit

__all__ = ["AlphaEditHyperParams", "apply_alphaedit_to_model", "alphaedit_update", "null_space_projector",
           "reset_alphaedit"]
