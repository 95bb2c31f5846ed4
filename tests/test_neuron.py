"""The dynamic neuron on tiny random models of every supported architecture."""
import threading

import pytest
import torch

from megedit.arch import neuron_size
from megedit.neuron import NeuronBatch, active_neurons, inject_neuron, injected_layer, remove_neuron
from megedit.tail_replay import TailStack, split_tail

from conftest import ARCHS, tiny_model

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Toko Yasuda, the"]


def _batch(tok, texts, side="right"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_unfamiliar_rows_are_bit_identical(arch, gpt2_tokenizer):
    model = tiny_model(arch)
    enc = _batch(gpt2_tokenizer, PROMPTS)
    with torch.no_grad():
        before = model(**enc).logits
        inject_neuron(model, 1)
        w = torch.randn(1, neuron_size(model)) * 3
        with active_neurons(NeuronBatch(torch.tensor([1]), w, 3)):
            after = model(**enc).logits
        outside = model(**enc).logits  # no active neurons: the hook is inert
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])
    assert torch.equal(outside, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_gets_its_own_neuron(arch, gpt2_tokenizer):
    """Batched rows with different neurons = each row run alone with its neuron."""
    model = tiny_model(arch)
    inject_neuron(model, 2)
    w = torch.randn(3, neuron_size(model))
    enc = _batch(gpt2_tokenizer, PROMPTS)
    with torch.no_grad(), active_neurons(NeuronBatch(torch.arange(3), w, 3)):
        batched = model(**enc).logits
    for i, text in enumerate(PROMPTS):
        single = _batch(gpt2_tokenizer, [text])
        n = single["input_ids"].shape[1]
        with torch.no_grad(), active_neurons(NeuronBatch(torch.tensor([0]), w[i:i + 1], 1)):
            alone = model(**single).logits
        torch.testing.assert_close(batched[i, :n], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_neuron_form_matches_an_extra_mlp_unit(arch, gpt2_tokenizer):
    """The hook adds exactly one hidden unit: for the dense form, an extra row/column of the two projections."""
    model = tiny_model(arch)
    neuron = inject_neuron(model, 0)
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    w = torch.randn(1, neuron_size(model))
    x = torch.randn(1, 5, d)
    expected_pre = x @ w[0, :d]
    if neuron.form == "gated":  # official MeG Llama form: un-gated, un-activated
        expected = expected_pre[..., None] * w[0, d:]
    else:
        mlp = model.transformer.h[0].mlp if hasattr(model, "transformer") else model.model.layers[0].mlp
        act = getattr(mlp, neuron.act_name)
        expected = act(expected_pre + w[0, d])[..., None] * w[0, d + 1:]
    mlp = model.transformer.h[0].mlp if hasattr(model, "transformer") else model.model.layers[0].mlp
    torch.testing.assert_close(neuron.neuron_output(mlp, x, w), expected)


def test_inject_is_idempotent_and_removable(gpt2_tokenizer):
    model = tiny_model("llama")
    keys = list(model.state_dict())
    a, b = inject_neuron(model, 1), inject_neuron(model, 1)
    assert a is b and injected_layer(model) == 1
    assert list(model.state_dict()) == keys  # parameter names unchanged while attached
    assert remove_neuron(model) == 1 and injected_layer(model) is None
    with pytest.raises(ValueError, match="out of range"):
        inject_neuron(model, 3)


def test_beam_expansion_repeats_rows():
    nb = NeuronBatch(torch.tensor([0, 2]), torch.tensor([[1.0], [2.0]]), 3).for_batch(6)
    assert nb.rows.tolist() == [0, 1, 4, 5] and nb.weights.squeeze(1).tolist() == [1.0, 1.0, 2.0, 2.0]


def test_active_neurons_do_not_leak_across_threads(gpt2_tokenizer):
    model = tiny_model("gpt2")
    inject_neuron(model, 1)
    enc = _batch(gpt2_tokenizer, PROMPTS[:1])
    with torch.no_grad():
        clean = model(**enc).logits
    seen = {}
    start = threading.Event()

    def other_thread():
        start.wait()
        with torch.no_grad():
            seen["logits"] = model(**enc).logits

    t = threading.Thread(target=other_thread)
    t.start()
    with active_neurons(NeuronBatch(torch.tensor([0]), torch.randn(1, neuron_size(model)) * 5, 1)):
        start.set()
        t.join()
    assert torch.equal(seen["logits"], clean)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_tail_stack_matches_full_model(arch, side, gpt2_tokenizer):
    """Replaying the upper layers on the answer positions gives the full model's logits there, neuron included."""
    model = tiny_model(arch)
    model.requires_grad_(False)
    inject_neuron(model, 1)
    tok = gpt2_tokenizer
    prompts, answers = PROMPTS, ["English", "France and Spain", "piano"]
    full = tok([p + " " + a for p, a in zip(prompts, answers)])["input_ids"]
    plen = [len(x) for x in tok(prompts)["input_ids"]]
    batch = split_tail(full, plen, tok.pad_token_id)
    stack = TailStack(model, 1, batch)
    w = torch.randn(3, neuron_size(model))
    with torch.no_grad(), active_neurons(NeuronBatch(torch.arange(3), w, 3)):
        hidden = stack.forward_hidden(stack.hidden)
        seq, pos = torch.nonzero(batch.labels != -100, as_tuple=True)
        replayed = stack.logits(hidden, seq, pos)
        for i in range(3):  # reference: the whole sequence through the whole model, neuron only on the tail
            ids = torch.tensor([full[i]])
            sel = seq == i
            ref_logits = _tail_only_reference(model, ids, plen[i], w[i])
            torch.testing.assert_close(replayed[sel], ref_logits, rtol=1e-4, atol=1e-4)


def _tail_only_reference(model, ids, prompt_len, w):
    """Full-model logits predicting the answer, with the neuron active only from the last prompt token on."""
    from megedit.neuron import current_neurons

    n = ids.shape[1]
    with active_neurons(None):
        prefix = model(input_ids=ids[:, : prompt_len - 1], use_cache=True) if prompt_len > 1 else None
    with active_neurons(NeuronBatch(torch.tensor([0]), w[None], 1)):
        out = model(input_ids=ids[:, prompt_len - 1: n - 1],
                    past_key_values=prefix.past_key_values if prefix else None, use_cache=True)
    return out.logits[0]
