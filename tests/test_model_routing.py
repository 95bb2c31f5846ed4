"""The runtime: a real MeGEdit (MiniLM encoder, familiarity gate, trained generator) wrapped around a tiny llama.

The gate is set by hand so that exactly the two EDIT prompts are familiar: its keys are their embeddings, tau is
high, and epsilon is above any entropy (the similarity guard alone decides).
"""
import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from megedit.arch import decoder_layers, neuron_size
from megedit.encoder import embed
from megedit.familiarity import FamiliarityNet
from megedit.generator import NeuronGenerator
from megedit.hparams import MeGHyperParams
from megedit.loading import load_encoder
from megedit.model import MeGEdit, MeGModel
from megedit.neuron import NeuronBatch, active_neurons, current_neurons, inject_neuron

from conftest import tiny_model

EDIT = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"]
OTHER = ["Paris is the capital of", "The weather in Oslo today is quite"]
MIXED = [EDIT[0], OTHER[0], EDIT[1], OTHER[1]]  # familiar rows: 0 and 2
TAU = 0.97
LAYER = 1


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def parts():
    encoder = load_encoder("all-MiniLM-L6-v2")
    keys = embed(encoder, EDIT)
    familiarity = FamiliarityNet(keys.shape[1], 16, 1, 4, n_keys=len(EDIT))
    familiarity.keys.copy_(keys.half())
    familiarity.epsilon.fill_(100.0)
    familiarity.tau.fill_(TAU)
    familiarity.requires_grad_(False)
    model = tiny_model("llama")
    hp = MeGHyperParams(model_name="tiny", layer=LAYER, generator="mlp", gen_hidden=32, gen_depth=2, gen_epochs=150,
                        gen_batch_size=2, gen_lr=1e-2)
    targets = torch.randn(len(EDIT), neuron_size(model), generator=torch.Generator().manual_seed(0)) * 3
    generator = NeuronGenerator(neuron_size(model), keys.shape[1], hp)
    generator.train_on(keys, torch.arange(len(EDIT)), targets, hp, progress=False)
    generator.requires_grad_(False)
    return encoder, familiarity, generator, hp, targets


@pytest.fixture()
def setup(parts, gpt2_tokenizer):
    """A fresh tiny llama, its unedited copy, and the edited model around it."""
    encoder, familiarity, generator, hp, _ = parts
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    edit = MeGEdit(encoder, familiarity, generator, LAYER, hp)
    gpt2_tokenizer.padding_side = "right"
    yield MeGModel(model, gpt2_tokenizer, edit), reference, gpt2_tokenizer
    gpt2_tokenizer.padding_side = "right"


def batch(tok, texts, side="right"):
    tok.padding_side = side
    try:
        return tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"


def hooked(model):
    """A copy of ``model`` with the neuron hook but no MeG around it: routing is done by hand."""
    model = copy.deepcopy(model)
    inject_neuron(model, LAYER)
    return model


def manual_route(parts, texts, familiar_rows) -> NeuronBatch:
    """The decision written out: the generator's weights for the rows we know are edits."""
    encoder, _, generator, _, _ = parts
    rows = torch.tensor(familiar_rows, dtype=torch.long)
    return NeuronBatch(rows, generator.sample(embed(encoder, [texts[i] for i in familiar_rows])), len(texts))


def own_decision(parts, edited, enc, familiar_rows) -> NeuronBatch:
    """The edited model's own decision for a batch, checked against ``manual_route``. Exact comparisons use this one:
    the encoder embeds the batch's prompts together, and a smaller batch may round differently on another CPU (1e-7)."""
    route = edited.route(enc["input_ids"], enc["attention_mask"])
    texts = edited.texts(enc["input_ids"], enc["attention_mask"])
    assert route.rows.tolist() == familiar_rows
    torch.testing.assert_close(route.weights, manual_route(parts, texts, familiar_rows).weights, rtol=1e-4, atol=1e-5)
    return route


def test_gate_is_what_we_set(parts, setup):
    edited, _, _ = setup
    targets = parts[-1]
    assert edited.edit.route(MIXED).rows.tolist() == [0, 2]
    assert edited.edit.route(OTHER).rows.numel() == 0
    assert edited.edit.route([f"{EDIT[0]} English and French"]).rows.numel() == 0  # prompt + answer: not this close
    weights = edited.edit.route(EDIT).weights
    assert (weights - targets).norm(dim=1).max() < 0.1 * targets.norm(dim=1).min()  # the generator learned them


def test_unfamiliar_rows_are_bit_identical_in_a_mixed_batch(setup):
    edited, reference, tok = setup
    enc = batch(tok, MIXED)
    with torch.no_grad():
        out = edited(**enc).logits
        base = reference(**enc).logits
    assert torch.equal(out[1], base[1]) and torch.equal(out[3], base[3])
    for i in (0, 2):
        n = int(enc["attention_mask"][i].sum())
        assert (out[i, :n] - base[i, :n]).abs().max() > 1e-3  # the edit rows do get a neuron
    with torch.no_grad():  # an all-unfamiliar batch is the unedited model
        assert torch.equal(edited(**batch(tok, OTHER)).logits, reference(**batch(tok, OTHER)).logits)


def test_left_and_right_padding_route_alike(setup):
    edited, _, tok = setup
    right, left = batch(tok, MIXED, "right"), batch(tok, MIXED, "left")
    assert edited.route(**right).rows.tolist() == edited.route(**left).rows.tolist() == [0, 2]
    assert edited.texts(right["input_ids"], right["attention_mask"]) == MIXED
    assert edited.texts(left["input_ids"], left["attention_mask"]) == MIXED
    with torch.no_grad():
        out_r, out_l = edited(**right).logits, edited(**left).logits
    for i in range(len(MIXED)):
        n = int(right["attention_mask"][i].sum())
        torch.testing.assert_close(out_r[i, :n], out_l[i, -n:], rtol=1e-4, atol=1e-5)


def test_generate_keeps_the_prefill_decision(parts, setup):
    edited, reference, tok = setup
    enc = batch(tok, MIXED, "left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    out = edited.generate(**enc, **kw)
    with torch.no_grad(), active_neurons(own_decision(parts, edited, enc, [0, 2])):
        manual = hooked(reference).generate(**enc, **kw)
    plain = reference.generate(**enc, **kw)
    assert torch.equal(out, manual)
    assert torch.equal(out[[1, 3]], plain[[1, 3]])
    assert not torch.equal(out[0], plain[0]) and not torch.equal(out[2], plain[2])
    # re-routing on the grown text would have dropped the edit: the decision really was kept from the prefill
    grown = edited.texts(out[[0, 2]], torch.ones_like(out[[0, 2]]))
    assert edited.edit.route(grown).rows.numel() == 0
    assert current_neurons() is None


def test_beam_search_expands_the_decision(parts, setup):
    """num_beams × num_return_sequences rows per prompt: each copy keeps its prompt's neuron (or none)."""
    edited, reference, tok = setup
    enc = batch(tok, MIXED, "left")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id, num_beams=2, num_return_sequences=2)
    out = edited.generate(**enc, **kw)
    with torch.no_grad(), active_neurons(own_decision(parts, edited, enc, [0, 2])):
        manual = hooked(reference).generate(**enc, **kw)
    plain = reference.generate(**enc, **kw)
    assert out.shape[0] == 2 * len(MIXED) and torch.equal(out, manual)
    assert torch.equal(out[[2, 3, 6, 7]], plain[[2, 3, 6, 7]]) and not torch.equal(out[:2], plain[:2])


def test_step_by_step_decoding_reuses_the_decision(parts, setup):
    edited, reference, tok = setup
    texts = [EDIT[0], OTHER[1]]
    enc = batch(tok, texts, "left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    route = own_decision(parts, edited, enc, [0])

    def decode(forward, prefill=None, steps=None, n_steps=3):
        """Prefill, then one token at a time from the returned cache; ``prefill``/``steps``: neurons set by hand."""
        with active_neurons(prefill):
            out = forward(input_ids=ids, attention_mask=mask, use_cache=True)
        logits, cache, m = [out.logits], out.past_key_values, mask
        for _ in range(n_steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            with active_neurons(steps):
                out = forward(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
        return logits

    manual = hooked(reference)
    with torch.no_grad():
        got = decode(edited)
        want = decode(manual, route, route)
        rerouted = decode(manual, route, None)  # what deciding again on each one-token step would give
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k in range(1, len(got)):
        assert not torch.equal(got[k][0], rerouted[k][0]) and torch.equal(got[k][1], rerouted[k][1])
    with torch.no_grad():  # a cache from elsewhere has no decision attached: refuse to guess
        foreign = reference(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="did not come from a MeGModel"):
            edited(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=foreign)


def test_no_state_leaks_between_calls(setup):
    edited, reference, tok = setup
    fam, unf = batch(tok, EDIT), batch(tok, OTHER)
    with torch.no_grad():
        base = reference(**unf).logits
        edited(**fam)
        assert torch.equal(edited(**unf).logits, base)
        edited.generate(**batch(tok, EDIT, "left"), max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(edited(**unf).logits, base)
        assert torch.equal(edited.model(**unf).logits, base)  # the wrapped model, called directly
    assert current_neurons() is None


def test_threads_match_sequential_calls(setup):
    edited, reference, tok = setup
    prompts = [EDIT[0], OTHER[0], EDIT[1], OTHER[1]] * 2
    inputs = [tok(p, return_tensors="pt") for p in prompts]

    def run(enc):
        with torch.no_grad():
            return edited(**enc).logits

    sequential = [run(enc) for enc in inputs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            threaded = list(pool.map(run, inputs))
            assert all(torch.equal(a, b) for a, b in zip(sequential, threaded))
    with torch.no_grad():
        assert not torch.equal(sequential[0], reference(**inputs[0]).logits)  # edit prompts were routed
        assert torch.equal(sequential[1], reference(**inputs[1]).logits)
    assert current_neurons() is None


def test_threads_generate_like_sequential_calls(setup):
    """generate() keeps its routing decision in a context variable across all its forward calls, per thread."""
    edited, reference, tok = setup
    prompts = [EDIT[0], OTHER[0], EDIT[1], OTHER[1]]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)

    def run(prompt):
        return edited.generate(**tok(prompt, return_tensors="pt"), **kw)

    sequential = [run(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, prompts * 2))
    assert all(torch.equal(a, b) for a, b in zip(sequential * 2, threaded))
    plain = [reference.generate(**tok(p, return_tensors="pt"), **kw) for p in prompts]
    assert not torch.equal(sequential[0], plain[0]) and torch.equal(sequential[1], plain[1])
    assert current_neurons() is None


def test_unload_restores_the_original_model(setup):
    edited, reference, tok = setup
    state = {k: v.clone() for k, v in edited.model.state_dict().items()}
    enc = batch(tok, MIXED)
    with torch.no_grad():
        before = reference(**enc).logits
        edited(**enc)
        edited.generate(**batch(tok, MIXED, "left"), max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    original = edited.unload()
    assert original is edited.model
    after = original.state_dict()
    assert after.keys() == state.keys() == reference.state_dict().keys()
    assert all(torch.equal(after[k], state[k]) and torch.equal(after[k], reference.state_dict()[k]) for k in state)
    assert not decoder_layers(original)[LAYER].mlp._forward_hooks
    assert not hasattr(decoder_layers(original)[LAYER].mlp, "megedit_neuron")
    some_neuron = NeuronBatch(torch.tensor([0]), torch.randn(1, neuron_size(original)) * 3, len(MIXED))
    with torch.no_grad(), active_neurons(some_neuron):  # no hook left to pick it up
        assert torch.equal(original(**enc).logits, before)


def test_gate_probe_rates_per_kind_and_never_on_trained_texts(parts):
    from megedit.augment import PseudoEditPool
    from megedit.probe import seen_by_training, gate_probe

    encoder, familiarity, generator, hp, _ = parts
    edit = MeGEdit(encoder, familiarity, generator, LAYER, hp)
    requests = [{"prompt": EDIT[0], "subject": "Danielle Darrieux", "target_new": "English",
                 "rephrase_prompt": EDIT[0],  # identical to a key: must pass
                 "locality": {"neighborhood": {"prompt": OTHER[0], "ground_truth": "France"}}}]
    pool = PseudoEditPool([
        {"prompt": f"The mother tongue of {s} is", "subject": s, "ground_truth": a,
         "rephrase_prompt": f"Where they grew up, {s} spoke"}
        for s, a in [("Jean Gabin", "French"), ("Sophia Loren", "Italian"), ("Pedro Almodovar", "Spanish")]
    ] + [{"prompt": f"{s} plays the", "subject": s, "ground_truth": a}
         for s, a in [("Miles Davis", "trumpet"), ("Yo-Yo Ma", "cello")]], seed=0)
    out = gate_probe(edit, requests, pool, questions=["nq question: who wrote hamlet"])
    rates = out["familiar_rate"]
    assert rates["edit_prompt"] == 1.0 and rates["rephrase"] == 1.0
    assert rates["locality"] == 0.0 and rates["questions"] == 0.0
    assert out["n"]["questions"] == 1
    assert all(0.0 <= v <= 1.0 for v in rates.values())
    seen = seen_by_training(pool, requests, hp)
    fresh = [t for pairs in pool.near_misses(requests[0], 2, salt="probe").values() for t, _ in pairs if t not in seen]
    assert sum(out["n"].get(f"near_{k}", 0) for k in ("same_relation", "same_subject", "unrelated")) == len(fresh)
