"""AlphaEdit's defining property: its update leaves the outputs of the preserved keys unchanged, where MEMIT's
(the same keys, targets and statistics) does not; and its running cache protects earlier edits."""
import importlib
from pathlib import Path

import pytest
import torch

from megedit.baselines.alphaedit import alphaedit_update, null_space_projector
from megedit.easyedit import compat, load_hparams
from megedit.stats import precompute_stats, text_documents
from conftest import REQUESTS, memit_style_hparams, save_tiny_model, write_texts

pytestmark = pytest.mark.usefixtures("single_thread", "easyedit")


def test_projected_update_is_blind_to_preserved_keys():
    """Pure algebra: keys spanning a 40-dim subspace of 64; the update must not move their outputs at all."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    preserved = randn(64, 40) @ randn(40, 500)  # 500 keys in a 40-dim subspace
    projector = null_space_projector(preserved @ preserved.T / 500, threshold=1e-8)
    keys, resid, no_cache = randn(64, 6), randn(16, 6), torch.zeros(64, 64, dtype=torch.float64)
    delta = alphaedit_update(keys, resid, projector, no_cache, l2=1.0)  # (64, 16)
    assert torch.allclose(projector @ delta, delta, atol=1e-10)  # the update lives in the null space
    assert (delta.T @ preserved).abs().max() < 1e-8 * delta.abs().max() * preserved.abs().max()
    unprojected = alphaedit_update(keys, resid, torch.eye(64, dtype=torch.float64), no_cache, l2=1.0)
    assert (unprojected.T @ preserved).abs().max() > 1e-2 * unprojected.abs().max() * preserved.abs().max()
    assert (delta.T @ keys).norm() > 0.1 * resid.norm()  # and it still writes something for the new keys


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 (c_proj keys are 128-dim) and statistics from fewer tokens than that: an exact null space."""
    root = tmp_path_factory.mktemp("alphaedit")
    model_path = save_tiny_model(root / "tiny-lm")
    texts = write_texts(root)
    paths = {alg: memit_style_hparams(root, model_path, alg=alg) for alg in ("MEMIT", "AlphaEdit")}
    precompute_stats(paths["MEMIT"], sources=[str(texts)], progress=False)
    return root, model_path, paths, texts


def preserved_keys(model, tok, texts, layer: int) -> torch.Tensor:
    """The c_proj inputs at every token of the statistics' text: the knowledge the covariance describes."""
    grabbed = []
    module = model.transformer.h[layer].mlp.c_proj
    handle = module.register_forward_pre_hook(lambda m, a: grabbed.append(a[0][0].detach().clone()))
    with torch.no_grad():
        for doc in text_documents([str(texts)]):
            model(torch.tensor([tok.encode(doc)]))
    handle.remove()
    return torch.cat(grabbed)  # (tokens, 128)


def _batch(editor, requests, keep):
    return editor.batch_edit([r["prompt"] for r in requests], [r["target_new"] for r in requests],
                             subject=[r["subject"] for r in requests], keep_original_weight=keep, verbose=False)


def _edit(alg_path, requests, **hp_changes):
    """Edit a fresh model through BaseEditor; returns (edited model, tokenizer, original weights of both layers)."""
    from easyeditor import BaseEditor

    hp = load_hparams(alg_path)
    for k, v in hp_changes.items():
        setattr(hp, k, v)
    hp.batch_size = len(requests)
    editor = BaseEditor.from_hparams(hp)
    before = {layer: editor.model.transformer.h[layer].mlp.c_proj.weight.detach().clone() for layer in hp.layers}
    _, edited, _ = _batch(editor, requests, keep=False)
    return editor, edited, before


def leak_bound(cov: torch.Tensor, threshold: float) -> float:
    """C0 = K0 K0ᵀ / n and Δ = PΔ give ‖Δᵀ K0‖ ≤ ‖Δ‖ ‖P K0‖, and ‖P K0‖² / ‖K0‖² = Σ_{λ<threshold} λ / Σ λ."""
    eigenvalues = torch.linalg.eigvalsh(cov.double()).clamp(min=0)
    return float((eigenvalues[eigenvalues < threshold].sum() / eigenvalues.sum()).sqrt())


def test_update_leaves_preserved_outputs_unchanged(setup):
    """On a model, through BaseEditor: the share of the update that reaches the preserved keys (the tokens the
    statistics were computed from) is within the bound the null space allows; without the projection it is not."""
    from megedit.easyedit.loader import load_model_named

    root, model_path, paths, texts = setup
    hp = load_hparams(paths["AlphaEdit"])
    unedited, tok = load_model_named(model_path)
    memit_main = importlib.import_module("easyeditor.models.memit.memit_main")
    ratios = {}
    for threshold in (hp.nullspace_threshold, 1e6):  # the configured null space, and all of key space (P = I)
        _, model, before = _edit(paths["AlphaEdit"], REQUESTS[:2], nullspace_threshold=threshold)
        for layer in (1, 2):
            keys = preserved_keys(unedited, tok, texts, layer)  # (tokens, d_k), what the covariance describes
            delta = model.transformer.h[layer].mlp.c_proj.weight.detach() - before[layer]  # Conv1D: out = x @ W
            assert delta.norm() > 1e-3 * before[layer].norm(), f"layer {layer} was not edited"
            ratios[threshold, layer] = float((keys @ delta).norm() / (keys.norm() * delta.norm()))
    for layer in (1, 2):
        with compat.runtime():
            cov = memit_main.get_cov(unedited, tok, f"transformer.h.{layer}.mlp.c_proj", hp.mom2_dataset,
                                     hp.mom2_n_samples, hp.mom2_dtype, hparams=hp)
        bound = leak_bound(cov, hp.nullspace_threshold)
        assert bound < 1e-2, "the test needs preserved keys that nearly avoid the null space"
        assert ratios[hp.nullspace_threshold, layer] <= 1.01 * bound + 1e-6, (layer, bound, ratios)
        assert ratios[1e6, layer] > 10 * bound, (layer, bound, ratios)  # the projection is what protects them


def edit_keys(model, tok, request, hp, layer: int) -> torch.Tensor:
    """The keys MEMIT/AlphaEdit compute for ``request`` at ``layer`` (EasyEdit's compute_ks), (1, d_k)."""
    from megedit.baselines.alphaedit.alphaedit_main import memit_modules, prepared_requests

    main, _, ks, _ = memit_modules()
    with compat.runtime():
        return ks.compute_ks(model, tok, prepared_requests([request]), hp, layer, main.get_context_templates(model, tok))


def test_running_cache_protects_earlier_edits(setup):
    """A second edit, with the first edit's keys in the cache, changes their outputs much less than without. (P = I
    here, so that the cache, not the preserved-knowledge projection, is what protects the first edit.)"""
    from megedit.baselines.alphaedit import reset_alphaedit

    root, model_path, paths, texts = setup
    hp = load_hparams(paths["AlphaEdit"])
    changes = {}
    for use_cache in (True, False):
        editor, model, _ = _edit(paths["AlphaEdit"], REQUESTS[:1], nullspace_threshold=1e6, L2=0.01)
        first = edit_keys(model, editor.tok, REQUESTS[0], hp, layer=2)
        w1 = model.transformer.h[2].mlp.c_proj.weight.detach().clone()
        if not use_cache:
            reset_alphaedit(model)  # forget the first edit's keys (the projections are recomputed)
        _batch(editor, REQUESTS[1:2], keep=False)
        changes[use_cache] = float((first @ (model.transformer.h[2].mlp.c_proj.weight - w1)).norm())
    assert changes[True] < 0.5 * changes[False], changes


def test_projection_cache_is_used_only_when_it_matches(setup, monkeypatch):
    """P is cached at P_loc with a sidecar naming its settings and the file's hash: a matching cache is read (no
    covariance needed), a file rewritten by another run is not, and both give the same P."""
    from megedit.baselines.alphaedit import alphaedit_main
    from megedit.easyedit.loader import load_model_named

    root, model_path, paths, _ = setup
    hp = load_hparams(paths["AlphaEdit"])
    hp.P_loc = str(root / "P" / "null_space_project.pt")
    model, tok = load_model_named(model_path)
    signature = alphaedit_main._signature(model, hp)
    with compat.runtime():
        computed = alphaedit_main._projectors(model, tok, hp, signature)
    memit_main = importlib.import_module("easyeditor.models.memit.memit_main")
    monkeypatch.setattr(memit_main, "get_cov", lambda *a, **k: pytest.fail("the cached P was not used"))
    assert torch.equal(alphaedit_main._projectors(model, tok, hp, signature), computed)
    assert alphaedit_main._load_projectors(Path(hp.P_loc), (*signature[:-1], 0.5)) is None  # other threshold
    torch.save(torch.zeros_like(computed).float(), hp.P_loc)  # rewritten by a run with other settings
    assert alphaedit_main._load_projectors(Path(hp.P_loc), signature) is None
