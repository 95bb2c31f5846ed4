"""``device_map``: the hparams field reaches ``from_pretrained``; neuron fitting and routing run on a dispatched model and
give what they give on the plain one; offloaded weights are refused with a clear message."""
import pytest
import torch

from megedit.fitting import fit_neurons
from megedit.loading import load_model
from megedit.model import MeGModel

from test_cli import tiny_model_dir
from tiny_meg import EDITS, LAYER, tiny_hparams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("device-map"))


def fits(model, tok, hp):
    views = [[r["prompt"]] for r in EDITS[:2]]
    return fit_neurons(model, tok, views, [r["target_new"] for r in EDITS[:2]], hp, progress=False)


def layer_map(first: str, second: str) -> dict:
    """Embeddings and layers below the edited one on ``first``; the edited layer and everything above on ``second``."""
    return {"model.embed_tokens": first, "model.rotary_emb": first,
            **{f"model.layers.{i}": first if i < LAYER else second for i in range(3)},
            "model.norm": second, "lm_head": second}


def test_device_map_from_hparams_fits_as_the_plain_model(model_dir, tmp_path, single_thread):
    hp = tiny_hparams(tmp_path, model_name=str(model_dir), fit_steps=5, device_map="auto")
    mapped, tok = load_model(hp)
    plain, _ = load_model(str(model_dir))
    assert torch.equal(fits(mapped, tok, hp).weights, fits(plain, tok, hp).weights)


def test_offloaded_weights_are_refused(model_dir):
    with pytest.raises(ValueError, match="offloads .* to cpu or disk: MeG needs every weight on a device"):
        load_model(str(model_dir), device_map=layer_map("cpu", "disk"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs to put the edited layer on another device")
def test_edited_layer_on_another_gpu(model_dir, tmp_path):
    """Embeddings on cuda:0, the edited layer and the LM head on cuda:1: fitting and routing as on one GPU."""
    hp = tiny_hparams(tmp_path, model_name=str(model_dir), fit_steps=5)
    split, tok = load_model(str(model_dir), device_map=layer_map(0, 1))
    whole, _ = load_model(str(model_dir), device="cuda:0")
    a, b = fits(split, tok, hp), fits(whole, tok, hp)
    assert torch.allclose(a.weights, b.weights, atol=1e-4)

    class Fixed:  # an edit that routes every query to edit 0's neuron, on whatever device the generator is
        layer = LAYER

        def route(self, texts):
            from megedit.neuron import NeuronBatch

            return NeuronBatch(torch.arange(len(texts)), a.weights[:1].expand(len(texts), -1), len(texts))

    ids = tok([EDITS[0]["prompt"]], return_tensors="pt")
    outs = [MeGModel(m, tok, Fixed()).forward(**ids.to("cuda:0")).logits[0, -1].cpu() for m in (split, whole)]
    assert torch.allclose(*outs, atol=1e-4)
