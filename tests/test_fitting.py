"""Stage 3: batched neuron fitting on tiny random models (llama: gated neuron, gpt2: dense neuron)."""
import pytest
import torch

import megedit.fitting as fitting
from megedit.arch import arch_of, decoder_layers, hidden_size, neuron_size
from megedit.fitting import canonicalise, fit_neurons
from megedit.hparams import MeGHyperParams
from megedit.neuron import DynamicNeuron, NeuronBatch, active_neurons

from conftest import tiny_model

# Each edit: its prompt first, then 1-2 more views. Single-token targets that the tiny models below can learn.
VIEWS = [["The capital of France is", "France's capital city is", "The capital city of France is"],
         ["Toko Yasuda plays the", "Toko Yasuda is incredible at"],
         ["Michel Denisot spoke the language", "The mother tongue of Michel Denisot is", "Michel Denisot speaks"]]
TARGETS = ["guitar", "Tokyo", "Rome"]
FIT_ARCHS = ["llama", "gpt2"]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def model_for_fitting(arch: str):
    """A tiny random model whose LM head is scaled up: at init std 0.02 its logits over 50k tokens are nearly flat,
    so no neuron could make an answer confident; ×50 gives logits of a real model's size."""
    model = tiny_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    return model


def hparams(**kw):
    return MeGHyperParams(**{"model_name": "x", "layer": 1, "fit_batch_edits": 2, "fit_steps": 40, "fit_lr": 0.1,
                             **kw})


@pytest.fixture(scope="module", params=FIT_ARCHS)
def fitted(request, gpt2_tokenizer):
    model = model_for_fitting(request.param)
    return model, fit_neurons(model, gpt2_tokenizer, VIEWS, TARGETS, hparams(), progress=False)


def answer_argmax(model, tok, prompt, answer, weights=None):
    """Full-model teacher forcing of ``prompt + " " + answer``: (argmax at the answer positions, answer tokens)."""
    ids = tok(prompt + " " + answer, return_tensors="pt")["input_ids"]
    n = len(tok(prompt)["input_ids"])
    batch = None if weights is None else NeuronBatch(torch.tensor([0]), weights[None], 1)
    with torch.no_grad(), active_neurons(batch):
        logits = model(input_ids=ids).logits[0]
    return logits[n - 1:-1].argmax(-1).tolist(), ids[0, n:].tolist()


def test_fit_reaches_ok(fitted, gpt2_tokenizer):
    model, res = fitted
    assert all(len(gpt2_tokenizer(" " + t)["input_ids"]) == 1 for t in TARGETS)
    assert res.weights.shape == (3, neuron_size(model)) and torch.isfinite(res.weights).all()
    assert res.ok.tolist() == [True, True, True]
    assert res.view_acc.tolist() == [1.0, 1.0, 1.0]
    assert ((res.steps >= 1) & (res.steps <= 40)).all() and torch.isfinite(res.loss).all()
    stopped = res.steps < 40  # an edit stops as soon as its loss is below fit_stop_loss
    assert stopped.any() and (res.loss[stopped] < 0.01).all()


def test_fitted_neuron_works_in_the_full_model(fitted, gpt2_tokenizer):
    """Not only in the tail replay: the whole model, neuron active at every position, predicts the target."""
    model, res = fitted
    for e, (views, target) in enumerate(zip(VIEWS, TARGETS)):
        for view in views:
            pred, gold = answer_argmax(model, gpt2_tokenizer, view, target, res.weights[e])
            assert pred == gold, (view, target)
        base, gold = answer_argmax(model, gpt2_tokenizer, views[0], target)
        assert base != gold  # the unedited model does not already say it
    # another edit's neuron does not give this edit's answer
    pred, gold = answer_argmax(model, gpt2_tokenizer, VIEWS[0][0], TARGETS[0], res.weights[1])
    assert pred != gold


def test_canonicalise_keeps_the_gated_neuron():
    model = tiny_model("llama")
    d = hidden_size(model)
    mlp = decoder_layers(model)[0].mlp
    neuron = DynamicNeuron("gated", None, d)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2 * d, generator=g) * torch.tensor([0.1, 1.0, 10.0, 3.0])[:, None]
    w[:, d:] *= torch.tensor([5.0, 0.2, 1.0, 0.01])[:, None]  # |w_in| and |w_out| far apart
    pre_sign = torch.tensor([1.0, -2.0, 0.5, -0.1])
    c = canonicalise(w, pre_sign, "gated", d)
    x = torch.randn(4, 6, d, generator=g)
    torch.testing.assert_close(neuron.neuron_output(mlp, x, c), neuron.neuron_output(mlp, x, w), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c[:, :d].norm(dim=1), c[:, d:].norm(dim=1))
    # the sign: flipped exactly where the pre-activation was negative
    dots = (c[:, :d] * w[:, :d]).sum(1)
    assert (dots.sign() == pre_sign.sign()).all()
    assert canonicalise(c, torch.ones(4), "gated", d).allclose(c, rtol=1e-5, atol=1e-6)  # idempotent
    dense = torch.randn(2, 2 * d + 1)
    assert canonicalise(dense, torch.tensor([-1.0, 1.0]), "dense", d) is dense


def test_fitted_llama_neurons_are_canonical(gpt2_tokenizer):
    """|w_in| = |w_out|, and the pre-activation on the edit's own answer positions is positive."""
    model = model_for_fitting("llama")
    res = fit_neurons(model, gpt2_tokenizer, VIEWS, TARGETS, hparams(fit_steps=10), progress=False)
    d = hidden_size(model)
    torch.testing.assert_close(res.weights[:, :d].norm(dim=1), res.weights[:, d:].norm(dim=1))
    mlp = decoder_layers(model)[1].mlp
    for e, views in enumerate(VIEWS):
        inputs = []
        handle = mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0, -1]))  # last prompt token
        try:
            with torch.no_grad():
                for v in views:  # single-token targets: the last prompt token is the only answer position
                    model(**gpt2_tokenizer(v, return_tensors="pt"))
        finally:
            handle.remove()
        assert float(torch.stack(inputs).mean(0) @ res.weights[e, :d]) > 0


@pytest.mark.parametrize("arch", FIT_ARCHS)
def test_fit_does_not_depend_on_the_batch(arch, gpt2_tokenizer):
    model = model_for_fitting(arch)
    # a few steps without early stopping: the trajectories agree up to float round-off
    short = [fit_neurons(model, gpt2_tokenizer, VIEWS, TARGETS, hparams(fit_batch_edits=b, fit_steps=3,
                                                                       fit_stop_loss=0.0), progress=False)
             for b in (1, 3)]
    torch.testing.assert_close(short[0].weights, short[1].weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(short[0].loss, short[1].loss, rtol=1e-5, atol=1e-5)
    # full fits with per-edit early stopping: each edit stops at the same step whatever it is batched with. (Adam
    # amplifies the float32 round-off of differently padded batches over 40 steps: allow 1e-3 on weights of norm ~5;
    # an edit affecting another would move them by O(lr) = 0.1 or more.)
    full = [fit_neurons(model, gpt2_tokenizer, VIEWS, TARGETS, hparams(fit_batch_edits=b), progress=False)
            for b in (1, 3)]
    assert torch.equal(full[0].steps, full[1].steps) and torch.equal(full[0].ok, full[1].ok)
    assert full[0].steps.unique().numel() > 1  # the edits did stop at different steps
    torch.testing.assert_close(full[0].weights, full[1].weights, rtol=0, atol=1e-3)


def test_fitting_leaves_the_model_as_it_was(gpt2_tokenizer):
    model = model_for_fitting("llama")
    model.model.embed_tokens.requires_grad_(False)  # a parameter the user had frozen stays frozen
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fit_neurons(model, gpt2_tokenizer, VIEWS[:2], TARGETS[:2], hparams(fit_steps=5), progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not flags["model.embed_tokens.weight"] and flags["model.layers.0.mlp.up_proj.weight"]
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were computed


def test_requires_grad_restored_when_fitting_fails(gpt2_tokenizer, monkeypatch):
    model = model_for_fitting("gpt2")

    def failing_chunk(*args, **kwargs):
        raise RuntimeError("simulated failure (e.g. out of memory) in the middle of fitting")

    monkeypatch.setattr(fitting, "_fit_chunk", failing_chunk)
    with pytest.raises(RuntimeError, match="simulated"):
        fit_neurons(model, gpt2_tokenizer, VIEWS, TARGETS, hparams(), progress=False)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", FIT_ARCHS)
def test_fit_a_bfloat16_model(arch, gpt2_tokenizer):
    model = model_for_fitting(arch).to(torch.bfloat16)
    res = fit_neurons(model, gpt2_tokenizer, VIEWS[:1], TARGETS[:1], hparams(fit_steps=5), progress=False)
    assert torch.isfinite(res.weights).all()


def test_initial_neuron_is_shared_and_seeded():
    model = tiny_model("gpt2")
    a, b = fitting.initial_neuron(model, 1.0, 0), fitting.initial_neuron(model, 1.0, 0)
    assert torch.equal(a, b) and not torch.equal(a, fitting.initial_neuron(model, 1.0, 1))
    assert a.shape == (neuron_size(model),) and a[hidden_size(model)] == 0  # dense form: the bias starts at 0
    assert arch_of(model).form == "dense"


def test_fit_views_limits_the_fits_not_the_gate(tmp_path, monkeypatch):
    """fit_views: each neuron is fitted on its prompt and its first views only; the gate still sees every view."""
    import megedit.meg_main as meg_main
    from megedit.meg_main import apply_meg_to_model

    from tiny_meg import EDITS, tiny_base, tiny_hparams

    seen = {}
    real_fit, real_texts = meg_main.fit_neurons, meg_main.build_texts
    monkeypatch.setattr(meg_main, "fit_neurons", lambda m, t, views, *a, **k: seen.setdefault("fit", views)
                        and real_fit(m, t, views, *a, **k))
    monkeypatch.setattr(meg_main, "build_texts", lambda *a: seen.setdefault("texts", real_texts(*a)))
    model, tok = tiny_base()
    apply_meg_to_model(model, tok, EDITS, tiny_hparams(tmp_path, fit_views=2), progress=False)
    all_views = seen["texts"].views
    assert max(map(len, all_views)) > 2  # the limit has something to cut
    assert seen["fit"] == [v[:2] for v in all_views]
    assert [v[0] for v in seen["fit"]] == [r["prompt"] for r in EDITS]
    assert len(seen["texts"].positives) == 2 * sum(map(len, all_views))  # routing learns from every view


def test_fit_views_must_not_be_negative():
    with pytest.raises(ValueError, match="fit_views"):
        hparams(fit_views=-1)


def test_gradient_init_fits_in_fewer_steps(gpt2_tokenizer):
    """fit_init=gradient: the same fits (ok on every view, canonical) after far fewer Adam steps than a random start."""
    model = model_for_fitting("llama")
    random, warm = (fit_neurons(model, gpt2_tokenizer, VIEWS, TARGETS, hparams(fit_init=init, fit_stop_loss=0.05),
                                progress=False) for init in ("random", "gradient"))
    assert warm.ok.all() and (warm.view_acc == 1).all()
    stopped = random.steps < 40  # the edits the random start fits to the stopping rule (on this tiny model: 2 of 3)
    assert stopped.sum() >= 2 and (warm.loss[stopped] < 0.05).all()
    assert (warm.steps[stopped] * 2 < random.steps[stopped]).all(), (warm.steps, random.steps)
    d = hidden_size(model)
    torch.testing.assert_close(warm.weights[:, :d].norm(dim=1), warm.weights[:, d:].norm(dim=1))
    for e, views in enumerate(VIEWS):  # in the full model too, neuron active at every position
        for view in views:
            pred, gold = answer_argmax(model, gpt2_tokenizer, view, TARGETS[e], warm.weights[e])
            assert pred == gold, (view, TARGETS[e])


def test_gradient_init_is_the_first_order_best_direction(gpt2_tokenizer):
    """The starting direction lowers the answer loss more than random directions of the same norm."""
    from megedit.fitting import GRADIENT_INIT_NORMS, _answer_loss, gradient_init
    from megedit.tail_replay import TailStack, split_tail
    from megedit.text import tokenize_answered

    model = model_for_fitting("llama")
    model.requires_grad_(False)
    views, target = VIEWS[0], TARGETS[0]
    full, plen = tokenize_answered(gpt2_tokenizer, views, [target] * len(views))
    batch = split_tail(full, plen, 0)
    stack = TailStack(model, 1, batch)
    fitting.inject_neuron(model, 1)
    tok_seq, tok_pos = torch.nonzero(batch.labels != -100, as_tuple=True)
    seq_edit = torch.zeros(len(views), dtype=torch.long)
    mlp = decoder_layers(model)[1].mlp
    args = (stack, seq_edit, tok_seq, tok_pos, batch.labels[tok_seq, tok_pos])
    start, start_loss = gradient_init(stack, mlp, *args[1:], 1, hidden_size(model), 0.01)
    loss = _answer_loss(*args, 1, start)
    torch.testing.assert_close(start_loss, loss)  # the loss it reports is the start's
    d = hidden_size(model)
    g = torch.Generator().manual_seed(0)
    norm = start[0, :d].norm()
    for _ in range(5):
        other = torch.randn(1, 2 * d, generator=g)
        other = torch.cat([other[:, :d] / other[:, :d].norm() * norm, other[:, d:] / other[:, d:].norm() * norm], 1)
        assert loss < _answer_loss(*args, 1, other)
    assert loss < _answer_loss(*args, 1)  # and it does lower the unedited model's loss
    assert len(GRADIENT_INIT_NORMS) > 1


def test_gradient_init_leaves_dense_neurons_at_the_random_start(gpt2_tokenizer):
    model = model_for_fitting("gpt2")
    a, b = (fit_neurons(model, gpt2_tokenizer, VIEWS[:1], TARGETS[:1], hparams(fit_init=init, fit_steps=3),
                        progress=False) for init in ("random", "gradient"))
    assert torch.equal(a.weights, b.weights)


def test_fit_init_must_be_known():
    with pytest.raises(ValueError, match="fit_init"):
        hparams(fit_init="warm")
