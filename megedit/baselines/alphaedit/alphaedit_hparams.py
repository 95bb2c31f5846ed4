"""AlphaEdit's hyperparameters: EasyEdit's MEMIT fields plus ``nullspace_threshold``, ``L2`` and ``P_loc``.

The YAML keys are exactly those of EasyEdit's own ``AlphaEditHyperParams`` (GitHub version), so one hparams file works
with either implementation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class AlphaEditHyperParams:
    # MEMIT's method settings (keys, target vectors z, the update spread over ``layers``)
    layers: list
    layer_selection: str
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool
    mom2_update_weight: float  # unused by AlphaEdit's solve; kept so MEMIT and AlphaEdit files share their keys
    # where things are in the model
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    # statistics of the preserved knowledge (the covariance files ``megedit stats`` writes)
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str
    # AlphaEdit: directions of the key space whose covariance eigenvalue is below this are the "null space"
    nullspace_threshold: float
    L2: float  # ridge term of the update's normal equations
    alg_name: str
    device: object  # "cpu", "cuda", "cuda:1", or an int N meaning "cuda:N" (EasyEdit's convention)
    model_name: str
    stats_dir: str
    P_loc: str | None = None  # where the projection matrices are cached (computed from the covariance if absent)
    max_length: int = 40
    batch_size: int = 1
    model_parallel: bool = False

    def __post_init__(self):
        if self.alg_name != "AlphaEdit":
            raise ValueError(f"alg_name must be 'AlphaEdit' for AlphaEditHyperParams, got {self.alg_name!r}")
        for name in ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight",
                     "nullspace_threshold", "L2"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML reads 2e-2 as a string
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not self.layers or not all(isinstance(x, int) for x in self.layers):
            raise ValueError(f"layers must be a non-empty list of layer indices, got {self.layers!r}")
        if self.nullspace_threshold <= 0 or self.L2 < 0:
            raise ValueError(f"nullspace_threshold must be > 0 and L2 >= 0, got {self.nullspace_threshold}, {self.L2}")

    @classmethod
    def from_hparams(cls, path: str | Path) -> "AlphaEditHyperParams":
        p = Path(path)
        if not p.exists() and p.suffix != ".yaml":
            p = Path(f"{path}.yaml")
        if not p.exists():
            raise FileNotFoundError(f"hparams file {str(path)!r} does not exist")
        config = yaml.safe_load(p.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{p} must be a YAML mapping")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(config))
        if unknown or missing:
            raise ValueError(f"{p}: unknown keys {unknown}, missing keys {missing}")
        return cls(**config)
