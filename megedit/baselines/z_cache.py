"""MEMIT-style target vectors z, cached per case in EasyEdit's own file format, so that an interrupted ``megedit run``
(or ``bench/precompute_z.py``) never computes one twice; megedit's AlphaEdit reads and writes the same files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_write

if TYPE_CHECKING:
    from ..run_config import Method, RunConfig

# What EasyEdit's compute_z reads (clamp_norm_factor and the layer are in the file name); max_length is not.
Z_SETTINGS = ("v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "kl_factor", "fact_token",
              "layer_module_tmp", "ln_f_module", "lm_head_module")


def z_cache_file(cache_template: str, hp, case_id) -> Path:
    """EasyEdit's per-case z file: ``cache_template`` filled with the z layer, the clamp factor and the case id."""
    return Path(str(cache_template).format(hp.layers[-1], hp.clamp_norm_factor, case_id))


def save_z(path: Path, z: np.ndarray) -> None:
    """EasyEdit's cache format ({"v_star": z}), written atomically: another process may be reading the folder."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, v_star=z)

    atomic_write(path, write)


def z_cache_template(cfg: RunConfig, method: Method, hp) -> str:
    """EasyEdit's cache_template ({z layer}, {clamp}, {case_id}) in a folder named by everything else z depends on
    (case ids are only unique within one data file, so the file is part of the name) and, unless ``share_z``, by the
    method, so that each method's edit time includes computing its own target vectors."""
    settings = {k: getattr(hp, k, None) for k in Z_SETTINGS}
    owner = {} if cfg.share_z else {"method": method.name}
    from ..easyedit.api import installed_api

    # the GitHub source's compute_z gives other z than the wheel's (other context templates): a host's z are its own;
    # named only on GitHub, so that caches written on the wheel keep their folder
    host = {"easyedit_api": "github"} if installed_api() == "github" else {}
    key = json.dumps({"model": hp.model_name, "seed": cfg.seed, "data": cfg.data_path, **owner, **host, **settings},
                     sort_keys=True, default=str)
    folder = cfg.z_cache / hashlib.sha1(key.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(key)
    return str(folder / "z_layer{}_clamp{}_case{}.npz")


def with_z_cache(apply, template: str, case_ids: dict[str, object], reused: list[int]):
    """EasyEdit's batch_edit passes no cache_template and drops case_id: put both back for MEMIT-style methods, and
    count in ``reused`` the target vectors that will come from the cache rather than be computed."""

    def call(model, tok, requests, hparams, **kwargs):
        for r in requests:
            r.setdefault("case_id", case_ids[r["prompt"]])
        reused[0] += sum(z_cache_file(template, hparams, r["case_id"]).exists() for r in requests)
        return apply(model, tok, requests, hparams, cache_template=template, **kwargs)

    return call
