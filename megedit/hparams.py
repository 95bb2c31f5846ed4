"""MeG hyperparameters: an EasyEdit-style dataclass read from YAML. YAML keys = field names = CLI names.

Every knob of the four stages is one field. ``from_hparams`` rejects unknown, missing and mistyped keys with a message
naming the field, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
import warnings
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from .precision import PRECISIONS
from .yaml_file import read_yaml_mapping


log = logging.getLogger(__name__)

# old key -> its name now: still accepted (YAML, saved edits' hparams.yaml, keyword arguments), with a warning
DEPRECATED_KEYS = {"gen_scheduler": "sample_scheduler", "gen_sample_steps": "sample_steps",
                   "dit_hidden": "gen_hidden", "dit_depth": "gen_depth"}


class HParamsError(ValueError):
    """A hyperparameter file or value is wrong; the message names the field and the fix."""


def type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, list) and all(type_ok(v, inner) for v in value)
    if hint is typing.Any:
        return True
    return isinstance(value, hint)


def coerce_value(value, hint):
    """YAML reads 1e-4 as a string; accept it for float fields (EasyEdit does the same)."""
    if isinstance(value, str) and type_ok(1.0, hint) and not type_ok(value, hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class MeGHyperParams:
    """All MeG settings. Required: ``model_name`` and ``layer``; everything else has a default."""

    model_name: str  # a builtin ("smollm2-135m"), a hub id or a local folder
    layer: int  # decoder layer whose MLP gets the dynamic neuron
    alg_name: str = "MeG"
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps"; an int N means "cuda:N" (EasyEdit's convention)
    # instead of `device`: from_pretrained's device_map for a model too large for one device ("auto", or a dict of
    # module name -> device); every weight must land on a device (no cpu/disk offload)
    device_map: str | dict | None = None
    seed: int = 0
    # matmul precision of stages 2-4 and of embedding the training texts (torch.autocast; see megedit/precision.py):
    # "float32", "bfloat16", or "auto" (bfloat16 where the device multiplies it natively). Query time is unaffected.
    training_precision: str = "float32"
    # EasyEdit's editor reads these
    max_length: int = 64
    batch_size: int = 1
    model_parallel: bool = False

    # pseudo-edits: a training split disjoint from the edits (relative paths are looked up under $MEGEDIT_DATA)
    pseudo_edit_data: str | None = None
    pseudo_edit_format: str = "auto"
    # records of pseudo_edit_data before this one are not in the pool: a validation part carved out of the same file,
    # on which settings are chosen (e.g. zsRE: records 0-199 validate, 200-999 train; hparams/README.md)
    pseudo_edit_offset: int = 0
    n_paraphrase_views: int = 6  # per edit: pool rephrasings of its prompt template, the subject swapped in
    n_prefix_views: int = 2  # per edit: its prompt behind a context prefix
    n_near_misses: int = 3  # per edit and kind: same relation/other subject, same subject/other relation, unrelated

    # stage 1: text encoder, tuned with InfoNCE (paraphrase = positive) plus hard negatives
    encoder_name: str = "all-MiniLM-L6-v2"
    encoder_tune: bool = True
    encoder_pairs: int = 4000  # pseudo-edit (prompt, paraphrase) pairs to tune on
    encoder_epochs: int = 1
    encoder_batch_size: int = 64
    encoder_lr: float = 2e-5
    encoder_trainable_layers: int = 2  # tune only the last N transformer layers (0 = all); the paper tunes one
    encoder_scale: float = 20.0  # 1/temperature of the InfoNCE logits
    encoder_hard_negatives: bool = True

    # stage 2: familiarity network (K-way on random labels; familiar = low prediction entropy)
    familiarity_classes: int = 10
    familiarity_hidden: int = 1536
    familiarity_blocks: int = 5
    familiarity_epochs: int = 30
    familiarity_batch_size: int = 256
    familiarity_lr: float = 1e-3
    familiarity_outlier_weight: float = 1.0  # weight of the max-entropy loss on near misses
    familiarity_epsilon: float | None = None  # entropy threshold; None = chosen on held-out pseudo-edits
    familiarity_holdout: int = 300  # pseudo-edits held out to choose epsilon
    # after every epoch, choose the thresholds on the held-out calibration queries and record them (report
    # "familiarity.curve"); it changes no weight. Needed by the stopping rule below.
    familiarity_curve: bool = False
    # stop once this many epochs in a row fail to raise the best held-out balanced accuracy by familiarity_min_delta
    # (needs familiarity_curve); 0: train all familiarity_epochs. The LR schedule is still planned over all of them.
    familiarity_patience: int = 0
    familiarity_min_delta: float = 0.0

    # stage 3: one neuron per edit
    fit_lr: float = 0.1
    fit_steps: int = 40
    fit_stop_loss: float = 0.01  # an edit stops once its mean cross-entropy over its views is below this
    fit_batch_edits: int = 32
    fit_init_scale: float = 1.0
    # where each fit starts: "random" (one shared random neuron, the paper's) or "gradient" (the unedited model's
    # steepest rank-one direction for that edit at a chosen norm; gated neurons only, others start at random)
    fit_init: str = "random"
    fit_silence_weight: float = 0.0  # keeps the neuron quiet on the prompt body (it is fitted at the answer positions)
    fit_views: int = 0  # fit each neuron on its prompt and its first fit_views - 1 views (0: all); its cost is linear in it

    # stage 4: generator of neuron weights from the query embedding
    generator: str = "dit"  # "dit" or "mlp"
    gen_hidden: int = 256  # width of either generator (the DiT's hidden size, the MLP's hidden layers)
    gen_depth: int = 4  # DiT blocks, or the MLP's hidden layers
    dit_heads: int = 4
    dit_patch_size: int = 64
    dit_mlp_ratio: float = 4.0
    dit_token_conditioning: bool = True  # also add the projected query embedding to every patch token
    gen_epochs: int = 200
    gen_min_steps: int = 0  # at least this many optimiser steps, whatever the number of edits
    # what one of gen_epochs is: "views" (every training query embedding once: ~18 per edit with the SmolLM2 views) or
    # "edits" (each edit once, through one of its query embeddings drawn at random: ~18x fewer steps an epoch)
    gen_epoch_unit: str = "views"
    # stop once this many held-out records in a row (one every checkpoint_gen_epochs epochs: the relative error of
    # the weights generated for the calibration edits' unseen views) miss the best before them by gen_stop_min_delta;
    # 0: train all epochs. The LR schedule is still planned over all epochs.
    gen_stop_patience: int = 0
    gen_stop_min_delta: float = 0.0
    # raise once the training loss (averaged over >= 2,000 rows) rises this many times above its best: a learning
    # rate too high for the number of edits, found in minutes instead of at the end; 0: off. Not in checkpoint keys.
    gen_diverge_ratio: float = 1.25
    gen_batch_size: int = 256
    gen_lr: float = 3e-4
    gen_weight_decay: float = 0.0
    gen_cond_dropout: float = 0.0
    gen_train_timesteps: int = 1000
    gen_beta_schedule: str = "linear"
    gen_timestep_sampling: str = "uniform"  # or "logit_normal" (SD3): train more where few-step sampling goes
    gen_logit_mean: float = 0.0
    gen_logit_std: float = 1.0
    gen_prediction_type: str = "v_prediction"
    gen_target_scale: float = 1.0  # neuron weights are divided by their per-coordinate std, then multiplied by this

    # query time: how the trained generator samples (MeGModel's sample_steps replaces sample_steps per model)
    sample_scheduler: str = "ddim"  # "ddim" or "ddpm"
    sample_steps: int = 10

    # after the gate: a query naming one of its nearest edits' subject passes only if, subject masked, it asks that
    # edit's relation (megedit/relation.py); its threshold is chosen on pool near misses unless relation_threshold is set
    relation_check: bool = False
    relation_top_k: int = 3  # nearest edits (by the gate's keys) whose subject is looked for in the query
    relation_threshold: float | None = None  # cosine similarity of the masked query to a masked view; None = chosen
    relation_calibration_edits: int = 300  # edits (and/or pool pseudo-edits) whose calibration queries choose it
    # calibration queries: "edits" (the edits' held-out views vs their same-subject near misses), "pool" (pool
    # pseudo-edits' own rephrasings vs their same-subject near misses: real paraphrases, for any edit set) or "both"
    relation_calibration: str = "both"
    # None: off; m: also refuse a query whose masked text lies more than m closer to another edit's masked prompt of
    # another relation than to the named edit's views and relation (it asks a relation that the batch edits elsewhere)
    relation_margin: float | None = None

    eval_batch_size: int = 32

    # long runs: save each stage's output, each chunk of fitted neurons and the generator's training state under
    # checkpoint_dir/<run key>/<stage>-<stage key> (hashes of requests, shared and per-stage hparams, base model), and
    # resume from there after an interrupt; a stage whose own and upstream settings are unchanged is reused
    checkpoint_dir: str | None = None  # None: no checkpoints
    checkpoint_gen_epochs: int = 10  # save the generator's training state every this many epochs

    # deprecated names of sample_scheduler, sample_steps, gen_hidden, gen_depth (DEPRECATED_KEYS)
    gen_scheduler: InitVar[str | None] = None
    gen_sample_steps: InitVar[int | None] = None
    dit_hidden: InitVar[int | None] = None
    dit_depth: InitVar[int | None] = None

    def __post_init__(self, gen_scheduler=None, gen_sample_steps=None, dit_hidden=None, dit_depth=None):
        old = dict(gen_scheduler=gen_scheduler, gen_sample_steps=gen_sample_steps, dit_hidden=dit_hidden,
                   dit_depth=dit_depth)
        for key, value in old.items():
            if value is not None:
                new = DEPRECATED_KEYS[key]
                if getattr(self, new) != getattr(type(self), new) and getattr(self, new) != value:
                    raise HParamsError(f"hparams key {key!r} is the old name of {new!r}: give only {new!r}")
                deprecated(key)
                setattr(self, new, value)
        if isinstance(self.device, int) and not isinstance(self.device, bool):
            self.device = f"cuda:{self.device}"
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = coerce_value(getattr(self, f.name), hints[f.name])
            setattr(self, f.name, value)
            if not type_ok(value, hints[f.name]):
                hint = hints[f.name]
                raise HParamsError(f"hparams field {f.name!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")
        if self.alg_name != "MeG":
            raise HParamsError(f"alg_name must be 'MeG' for MeGHyperParams, got {self.alg_name!r}")
        choices = {"generator": ("dit", "mlp"), "sample_scheduler": ("ddim", "ddpm"),
                   "gen_timestep_sampling": ("uniform", "logit_normal"), "gen_epoch_unit": ("views", "edits"),
                   "fit_init": ("random", "gradient"),
                   "gen_prediction_type": ("v_prediction", "epsilon", "sample"),
                   "pseudo_edit_format": ("auto", "counterfact", "counterfact-rome", "zsre"),
                   "training_precision": PRECISIONS, "relation_calibration": ("edits", "pool", "both")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise HParamsError(f"hparams field {name!r} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ["familiarity_classes", "fit_steps", "fit_batch_edits", "gen_epochs", "gen_batch_size",
                    "sample_steps", "gen_hidden", "gen_depth", "dit_heads", "dit_patch_size", "eval_batch_size",
                    "familiarity_epochs", "familiarity_batch_size", "encoder_batch_size", "gen_train_timesteps",
                    "checkpoint_gen_epochs", "encoder_epochs", "encoder_pairs", "relation_top_k",
                    "relation_calibration_edits"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparams field {name!r} must be positive, got {getattr(self, name)!r}")
        # 0 is meaningful: every view / no floor / no stopping rule
        for name in ("fit_views", "gen_min_steps", "pseudo_edit_offset", "gen_stop_patience", "gen_stop_min_delta",
                     "gen_diverge_ratio", "familiarity_patience", "familiarity_min_delta"):
            if getattr(self, name) < 0:
                raise HParamsError(f"hparams field {name!r} must be >= 0, got {getattr(self, name)!r}")
        if 0 < self.gen_diverge_ratio <= 1:
            raise HParamsError(f"gen_diverge_ratio must be 0 (off) or above 1, got {self.gen_diverge_ratio!r}: at "
                               "or below 1 every epoch that is not a new best would stop training")
        if self.familiarity_patience and not self.familiarity_curve:
            raise HParamsError("familiarity_patience needs familiarity_curve: true (the held-out record it stops on)")
        if self.relation_margin is not None and not -2 <= self.relation_margin <= 2:  # cosine similarities: NaN too
            raise HParamsError(f"relation_margin must be None or a number in [-2, 2], got {self.relation_margin!r}")
        if self.familiarity_classes < 2:
            raise HParamsError("familiarity_classes must be at least 2 (entropy of a 1-way prediction is always 0)")
        if self.layer < 0:
            raise HParamsError(f"layer must be a layer index >= 0, got {self.layer}")
        if self.gen_hidden % self.dit_heads:
            raise HParamsError(f"gen_hidden ({self.gen_hidden}) must be divisible by dit_heads ({self.dit_heads})")
        if self.sample_steps > self.gen_train_timesteps:
            raise HParamsError("sample_steps cannot exceed gen_train_timesteps")

    @classmethod
    def from_dict(cls, config: dict, source: str = "hparams") -> "MeGHyperParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in config if k in DEPRECATED_KEYS and DEPRECATED_KEYS[k] in config]
        if unknown:
            raise HParamsError(f"{source}: {unknown[0]!r} is the old name of {DEPRECATED_KEYS[unknown[0]]!r}: "
                               "give only the new one")
        names |= set(DEPRECATED_KEYS)
        unknown = sorted(set(config) - names)
        if unknown:
            hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, names, 1)[0]!r}?)"
                     if difflib.get_close_matches(k, names, 1) else repr(k) for k in unknown]
            raise HParamsError(f"{source}: unknown key(s) {', '.join(hints)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise HParamsError(f"{source}: missing required key(s) {missing}")
        try:
            return cls(**config)
        except HParamsError as e:
            raise HParamsError(f"{source}: {e}") from None

    @classmethod
    def from_hparams(cls, path: str | Path) -> "MeGHyperParams":
        """Read a YAML file (EasyEdit's ``HyperParams.from_hparams``); ``.yaml`` may be left off."""
        p = Path(path)
        if not p.exists() and p.suffix != ".yaml" and Path(f"{path}.yaml").exists():
            p = Path(f"{path}.yaml")
        config = read_yaml_mapping(p, "hparams file", HParamsError, missing_error=HParamsError)
        return cls.from_dict(config, source=str(p))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "MeGHyperParams":
        return dataclasses.replace(self, **changes)


def deprecated(key: str) -> None:
    """Warn that hparams key ``key`` has a new name (a DeprecationWarning, and a logged warning for YAML users)."""
    message = f"hparams key {key!r} is deprecated: it is now {DEPRECATED_KEYS[key]!r} (the old key still works)"
    warnings.warn(message, DeprecationWarning, stacklevel=4)
    log.warning(message)
