"""Exact restore through the EasyEdit entry point, on a real (tiny) MeG run.

MeG changes no weight: EasyEdit's restore from ``weights_copy`` and ``unload()`` both give the original parameters
bit for bit, and queries the gate rejects get bit-identical logits while the edit is on.
(The same properties for a hand-built edit, with generate and beam search: test_model_routing.py.)
"""
import copy

import pytest
import torch

from megedit.meg_main import apply_meg_to_model
from megedit.model import MeGModel

from tiny_meg import EDITS, LAYER, UNRELATED, tiny_base, tiny_hparams

PROMPTS = [r["prompt"] for r in EDITS]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def logits(model, tok, texts):
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_weights_copy_and_unload_restore_exactly(tmp_path):
    model, tok = tiny_base()
    reference = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    edited, weights_copy = apply_meg_to_model(model, tok, EDITS, tiny_hparams(tmp_path), return_orig_weights=True,
                                              progress=False)
    assert edited.model is model  # copy=False: edited in place, as EasyEdit expects
    layer_params = {n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{LAYER}.")}
    assert layer_params and set(weights_copy) == layer_params
    assert all(torch.equal(weights_copy[k], original[k]) for k in weights_copy)

    # while the edit is on: rows the gate rejects are the unedited model, bit for bit, even batched with edit rows
    texts = PROMPTS + UNRELATED
    routed = edited.edit.route(texts).rows.tolist()
    rejected = [i for i in range(len(texts)) if i not in routed]
    assert routed and rejected, routed  # both kinds present, or the test proves nothing
    out, base = logits(edited, tok, texts), logits(reference, tok, texts)
    assert all(torch.equal(out[i], base[i]) for i in rejected)
    assert all(not torch.equal(out[i], base[i]) for i in routed)

    # EasyEdit's restore: write weights_copy back into the model's parameters
    with torch.no_grad():
        for name, value in weights_copy.items():
            model.get_parameter(name)[...] = value
    assert max_difference(model.state_dict(), original) == 0.0
    assert torch.equal(logits(model, tok, texts), base)  # the base model, called directly, answers as before

    restored = edited.unload()
    assert restored is model and max_difference(restored.state_dict(), original) == 0.0
    assert all(not layer.mlp._forward_hooks for layer in restored.model.layers)
    assert torch.equal(logits(restored, tok, texts), base)


def test_copy_leaves_the_given_model_untouched(tmp_path):
    model, tok = tiny_base()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    edited, weights_copy = apply_meg_to_model(model, tok, EDITS[:2], tiny_hparams(tmp_path), copy=True,
                                              progress=False)
    assert edited.model is not model and weights_copy == {}
    assert all(not layer.mlp._forward_hooks for layer in model.model.layers)
    assert max_difference(model.state_dict(), original) == 0.0


def test_editing_again_replaces_the_previous_edit(tmp_path):
    """Independent edits do not pile up: re-editing a MeGModel leaves one neuron, and equals editing the base."""
    hp = tiny_hparams(tmp_path)
    model, tok = tiny_base()
    first, _ = apply_meg_to_model(model, tok, EDITS, hp, progress=False)
    second, _ = apply_meg_to_model(first, tok, EDITS[2:], hp, keep_original_weight=True, progress=False)
    assert isinstance(second, MeGModel) and second.model is model
    assert [len(layer.mlp._forward_hooks) for layer in model.model.layers] == [0, 1, 0]
    fresh, _ = apply_meg_to_model(tiny_base()[0], tok, EDITS[2:], hp, progress=False)
    assert torch.equal(logits(second, tok, PROMPTS + UNRELATED), logits(fresh, tok, PROMPTS + UNRELATED))
