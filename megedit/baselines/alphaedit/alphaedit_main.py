"""AlphaEdit: MEMIT's update, projected onto the null space of the preserved knowledge.

Per edited layer, MEMIT has keys K (d_k × n: inputs of the rewritten module at the subject's last token, averaged
over context templates), residuals R (d_v × n: what the layer's output should gain) and the covariance C0 of the keys
of preserved knowledge (from the statistics files). AlphaEdit (Fang et al., ICLR 2025, and its official code):

    P  = U[:, S < nullspace_threshold] · U[:, S < nullspace_threshold]ᵀ      where C0 = U diag(S) Uᵀ
    Δ  = solve( P (K Kᵀ + C_prev) + L2·I ,  P K Rᵀ )                         (d_k × d_v);  W ← W + Δᵀ
    C_prev ← C_prev + K' K'ᵀ  after the edit (K' = the keys recomputed on the edited model)

The solution satisfies Δ = PΔ (apply I−P to the equation: L2·(I−P)Δ = 0), so a preserved key k0's output
changes by Δᵀk0 = Δᵀ(P k0), and P k0 ≈ 0 because k0 lies in the span of C0's large-eigenvalue directions.
``C_prev``, the running sum over earlier edits' keys, makes later edits keep earlier ones in the same way.

Keys, target vectors z (with EasyEdit's per-case cache file, shared with MEMIT when the z settings agree), context
templates and the covariance all come from the installed EasyEdit's MEMIT code; only the projection and the solve
are written here.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import weakref
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...easyedit.api import import_easyeditor, installed_api
from ...easyedit.sequential import edits_stay
from ..z_cache import save_z, z_cache_file
from .alphaedit_hparams import AlphaEditHyperParams


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projection onto the eigen-directions of the (symmetric PSD) ``cov`` with eigenvalue below ``threshold``."""
    eigenvalues, vectors = torch.linalg.eigh(cov.double())
    null = vectors[:, eigenvalues < threshold]  # (d, k)
    return null @ null.T  # (d, d)


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, cache: torch.Tensor,
                     l2: float) -> torch.Tensor:
    """Δ (d_k × d_v) from keys (d_k × n), residuals (d_v × n), P (d_k × d_k) and the earlier edits' K Kᵀ sum."""
    K, R, P = keys.double(), resid.double(), projector.double()
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(P @ (K @ K.T + cache.double()) + l2 * eye, P @ K @ R.T)


@dataclass
class _EditState:
    """What AlphaEdit remembers about one model: its projections and the keys of the edits kept on it."""

    signature: tuple
    projectors: torch.Tensor  # (L, d_k, d_k), float64
    cache: torch.Tensor  # (L, d_k, d_k), float64: Σ K Kᵀ of earlier kept edits


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reset_alphaedit(model) -> None:
    """Forget the running key cache (and projections) kept for ``model``."""
    _STATES.pop(model, None)


def memit_modules():
    """The installed EasyEdit's MEMIT functions (imported with megedit's import-time shims)."""
    import_easyeditor()
    names = ("easyeditor.models.memit.memit_main", "easyeditor.models.memit.compute_z",
             "easyeditor.models.memit.compute_ks", "easyeditor.util.nethook")
    main, z, ks, nethook = (importlib.import_module(n) for n in names)
    return main, z, ks, nethook


def easyedit_runtime():
    """The wheel's runtime fixes when the wheel is what is installed (re-entrant inside a BaseEditor call)."""
    from ...easyedit.compat import runtime

    return runtime() if installed_api() == "wheel" else nullcontext()


def _signature(model, hp: AlphaEditHyperParams) -> tuple:
    return (model.config._name_or_path, tuple(hp.layers), hp.rewrite_module_tmp, hp.mom2_dataset, hp.mom2_n_samples,
            hp.mom2_dtype, float(hp.nullspace_threshold))


def _load_projectors(path: Path, signature: tuple) -> torch.Tensor | None:
    """The cached P if its sidecar names these settings and the file's bytes (another run may be rewriting it)."""
    meta = path.with_name(path.name + ".json")
    if not (path.exists() and meta.exists()):
        return None
    expected, data = json.loads(meta.read_text()), path.read_bytes()
    as_json = json.loads(json.dumps(list(signature)))  # tuples come back from JSON as lists
    if expected.get("signature") != as_json or expected.get("sha1") != hashlib.sha1(data).hexdigest():
        return None
    return torch.load(io.BytesIO(data), map_location="cpu").double()


def _save_projectors(path: Path, projectors: torch.Tensor, signature: tuple) -> None:
    """The tensor alone, as EasyEdit's own AlphaEdit stores P, each file replaced atomically."""
    buffer = io.BytesIO()
    torch.save(projectors.float(), buffer)
    data = buffer.getvalue()
    meta = json.dumps({"signature": list(signature), "sha1": hashlib.sha1(data).hexdigest()})
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, data), (path.with_name(path.name + ".json"), meta.encode())):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, target)


def _projectors(model, tok, hp: AlphaEditHyperParams, signature: tuple) -> torch.Tensor:
    """P for every layer, from the covariance statistics (cached at ``P_loc`` with a sidecar naming what it is for)."""
    path = Path(hp.P_loc) if hp.P_loc else None
    if path is not None and (cached := _load_projectors(path, signature)) is not None:
        return cached
    main = memit_modules()[0]
    projectors = torch.stack([
        null_space_projector(main.get_cov(model, tok, hp.rewrite_module_tmp.format(layer), hp.mom2_dataset,
                                          hp.mom2_n_samples, hp.mom2_dtype, hparams=hp).cpu(), hp.nullspace_threshold)
        for layer in hp.layers])
    projectors = projectors.float().double()  # as stored: a run that reads the cache edits exactly like this one
    if path is not None:
        _save_projectors(path, projectors, signature)
    return projectors


def _state(model, tok, hp: AlphaEditHyperParams, reset: bool) -> _EditState:
    signature = _signature(model, hp)
    state = _STATES.get(model)
    if state is None or state.signature != signature:
        projectors = _projectors(model, tok, hp, signature)
        state = _EditState(signature, projectors, torch.zeros_like(projectors))
        _STATES[model] = state
    elif reset:
        state.cache.zero_()
    return state


def prepared_requests(requests: list[dict]) -> list[dict]:
    """EasyEdit's request form for MEMIT's code: target with a leading space, subject replaced by "{}" in the prompt."""
    out = deepcopy(list(requests))
    for r in out:
        if not r.get("subject") or r["subject"] not in r["prompt"].replace("{}", r["subject"]):
            raise ValueError(f"AlphaEdit needs each request's subject inside its prompt; got subject "
                             f"{r.get('subject')!r} for prompt {r['prompt']!r}")
        if not r["target_new"].startswith(" "):
            r["target_new"] = " " + r["target_new"]
        r["prompt"] = r["prompt"].replace(r["subject"], "{}") if "{}" not in r["prompt"] else r["prompt"]
    return out


def target_vectors(model, tok, requests, hp, context_templates, cache_template) -> torch.Tensor:
    """z for every request (d × n), read from / written to EasyEdit's per-case cache file when a template is given."""
    _, z_module, _, _ = memit_modules()
    zs = []
    for r in requests:
        path = None
        if cache_template is not None:
            if "case_id" not in r:
                raise ValueError("cache_template needs a 'case_id' in every request")
            path = z_cache_file(cache_template, hp, r["case_id"])
        if path is not None and path.exists():
            zs.append(torch.from_numpy(np.load(path)["v_star"]))
            continue
        z = z_module.compute_z(model, tok, r, hp, hp.layers[-1], context_templates).detach().cpu()
        if path is not None:
            save_z(path, z.numpy())
        zs.append(z)
    return torch.stack(zs, dim=1)


def apply_alphaedit_to_model(model, tok, requests, hparams: AlphaEditHyperParams, copy: bool = False,
                             return_orig_weights: bool = False, keep_original_weight: bool = False,
                             cache_template: str | None = None, reset_cache: bool = False, **kwargs):
    """EasyEdit's ``apply_<alg>_to_model`` contract: returns ``(edited_model, weights_copy)``.

    Edits stay on the model and their keys join the running cache when EasyEdit will keep them
    (``edits_stay``: the wheel's ``keep_original_weight=False``, the GitHub API's ``sequential_edit=True``); otherwise
    ``weights_copy`` holds the original weights, which EasyEdit writes back, as with the wheel's MEMIT
    (memit_main.py:55-62).
    """
    if not requests:
        raise ValueError("no requests to edit")
    if copy:
        model = deepcopy(model)
    main, _, ks_module, nethook = memit_modules()
    hp, requests, stay = hparams, prepared_requests(requests), edits_stay(keep_original_weight)
    with easyedit_runtime():
        state = _state(model, tok, hp, reset_cache)
        names = [f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in hp.layers]
        weights = {name: nethook.get_parameter(model, name) for name in names}
        weights_copy = {name: w.detach().clone() for name, w in weights.items()} if return_orig_weights else {}
        context_templates = main.get_context_templates(model, tok)
        zs = target_vectors(model, tok, requests, hp, context_templates, cache_template)  # (d, n)
        for i, (layer, name) in enumerate(zip(hp.layers, names)):
            keys = ks_module.compute_ks(model, tok, requests, hp, layer, context_templates).T  # (d_k, n)
            current = main.get_module_input_output_at_words(
                model, tok, hp.layers[-1], context_templates=[r["prompt"] for r in requests],
                words=[r["subject"] for r in requests], module_template=hp.layer_module_tmp,
                fact_token_strategy=hp.fact_token, track="out").T  # (d, n)
            targets = zs.to(current.device, current.dtype) - current
            resid = targets.repeat_interleave(keys.shape[1] // targets.shape[1], dim=1) / (len(hp.layers) - i)
            device = weights[name].device
            delta = alphaedit_update(keys.to(device), resid.to(device), state.projectors[i].to(device),
                                     state.cache[i].to(device), hp.L2)  # (d_k, d_v)
            with torch.no_grad():
                weights[name] += main.upd_matrix_match_shape(delta, weights[name].shape).to(weights[name].dtype)
        if stay:  # later edits must keep these keys too
            for i, layer in enumerate(hp.layers):
                keys = ks_module.compute_ks(model, tok, requests, hp, layer, context_templates).T.double().cpu()
                state.cache[i] += keys @ keys.T
    return model, ({} if stay else weights_copy)
