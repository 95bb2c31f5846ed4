"""megedit: MeG (Massive editing for LLMs via dynamic weight Generation) as an EasyEdit-style editor."""
from .data import load_requests, validate_requests
from .evaluate import evaluate_requests, locality_reference
from .hparams import HParamsError, MeGHyperParams
from .loading import load_encoder, load_model
from .meg_main import apply_meg_to_model, train_meg
from .model import MeGEdit, MeGModel

__version__ = "0.1.0"
__all__ = ["MeGHyperParams", "HParamsError", "apply_meg_to_model", "train_meg", "load_model", "load_encoder",
           "load_requests", "validate_requests", "evaluate_requests", "locality_reference", "MeGEdit", "MeGModel"]
