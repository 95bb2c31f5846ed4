"""Stage 4: the DiT and the neuron generator (shapes, initialisation, memorisation, determinism, save/load, threads)."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from megedit.dit import DiT
from megedit.generator import NeuronGenerator, loss_rose
from megedit.hparams import MeGHyperParams

E, P, C = 16, 130, 32  # memorisation task: edits, weights per neuron, condition size
SMALL = dict(gen_hidden=64, gen_depth=2, dit_heads=4, dit_patch_size=16, gen_batch_size=16, gen_lr=3e-3)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def hparams(**overrides) -> MeGHyperParams:
    return MeGHyperParams(model_name="x", layer=0, **{**SMALL, **overrides})


def task():
    """E random targets around a shared offset, each with its own unit-norm condition."""
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(E, P, generator=g) * 0.3 + torch.randn(P, generator=g)
    conds = torch.nn.functional.normalize(torch.randn(E, C, generator=g), dim=1)
    return conds, targets


def relative_error(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """L2 error relative to the targets' spread around their mean: predicting the mean scores 1."""
    return float(((pred - targets).norm(dim=1) / (targets - targets.mean(0)).norm(dim=1)).mean())


@pytest.fixture(scope="module")
def trained():
    """A small DiT generator memorising the task (v-prediction, the default), trained once for the module."""
    conds, targets = task()
    hp = hparams(gen_epochs=600)
    gen = NeuronGenerator(P, C, hp)
    stats = gen.train_on(conds, torch.arange(E), targets, hp, progress=False)
    return gen, hp, conds, targets, stats


@pytest.mark.parametrize("size", [1153, 10])  # odd, and smaller than one patch
def test_dit_shapes(size):
    model = DiT(size, C, patch_size=64, hidden=32, depth=2, heads=4)
    x, cond = torch.randn(3, size), torch.randn(3, C)
    assert model(x, torch.tensor([0, 500, 999]), cond).shape == (3, size)
    assert model(x, torch.tensor([0.5, 7.0, 999.0]), cond).shape == (3, size)
    with pytest.raises(ValueError, match="length"):
        model(torch.randn(3, size + 1), torch.tensor([1, 2, 3]), cond)


def test_dit_starts_as_identity_with_zero_output():
    model = DiT(P, C, patch_size=16, hidden=32, depth=2, heads=4)
    x, c = torch.randn(4, 9, 32), torch.randn(4, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.equal(model(torch.randn(4, P), torch.tensor([1, 10, 100, 999]), torch.randn(4, C)),
                       torch.zeros(4, P))


def test_condition_dropout_only_in_training():
    model = DiT(P, C, patch_size=16, hidden=32, depth=2, heads=4, cond_dropout=1.0)
    for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1]):
        torch.nn.init.normal_(layer.weight)  # so the output is not identically 0 and depends on the condition
    x, t = torch.randn(1, P).expand(2, -1), torch.tensor([500, 500])
    cond = torch.randn(2, C)
    out = model.train()(x, t, cond)
    assert torch.equal(out[0], out[1])  # both rows got the null embedding
    out = model.eval()(x, t, cond)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_dit_generator_memorises(trained, sampler):
    gen, hp, conds, targets, stats = trained
    assert stats["steps"] == 600 and stats["loss"] < 0.2
    sampling = NeuronGenerator(P, C, hp.replace(sample_scheduler=sampler))
    sampling.load_state_dict(gen.state_dict())
    assert relative_error(targets.mean(0).expand(E, -1), targets) == pytest.approx(1.0)
    for steps in (1, 2, 10):
        assert relative_error(sampling.sample(conds, steps=steps), targets) < 0.45, steps


def test_mlp_generator_memorises():
    conds, targets = task()
    hp = hparams(generator="mlp", gen_epochs=300)
    gen = NeuronGenerator(P, C, hp)
    gen.train_on(conds, torch.arange(E), targets, hp, progress=False)
    assert relative_error(gen.sample(conds), targets) < 0.05


def test_paraphrases_share_their_edits_target():
    conds, targets = task()
    views = torch.cat([conds, conds + 0.01 * torch.randn(E, C)])  # each edit twice: itself and a near paraphrase
    hp = hparams(generator="mlp", gen_epochs=300)
    gen = NeuronGenerator(P, C, hp)
    gen.train_on(views, torch.arange(E).repeat(2), targets, hp, progress=False)
    assert relative_error(gen.sample(conds), targets) < 0.05


def test_training_and_sampling_are_deterministic():
    conds, targets = task()
    hp = hparams(gen_epochs=5, gen_batch_size=4, gen_cond_dropout=0.3)
    runs = []
    for _ in range(2):
        gen = NeuronGenerator(P, C, hp)
        gen.train_on(conds, torch.arange(E), targets, hp, progress=False)
        runs.append((gen.state_dict(), gen.sample(conds)))
    (state_a, sample_a), (state_b, sample_b) = runs
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(sample_a, sample_b)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_batch_independent(trained, sampler):
    gen, hp, conds, _, _ = trained
    gen = NeuronGenerator(P, C, hp.replace(sample_scheduler=sampler))
    gen.load_state_dict(trained[0].state_dict())
    batched = gen.sample(conds, steps=5)
    alone = torch.cat([gen.sample(conds[i:i + 1], steps=5) for i in range(E)])
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-6)  # only matmul blocking may differ
    assert torch.equal(gen.sample(conds[:3].flip(0), steps=5), gen.sample(conds[:3], steps=5).flip(0))


def test_save_load_round_trip_is_bit_identical(trained):
    gen, hp, conds, _, _ = trained
    fresh = NeuronGenerator(P, C, hp)
    assert not torch.equal(fresh.sample(conds), gen.sample(conds))
    fresh.load_state_dict(gen.state_dict())
    assert torch.equal(fresh.sample(conds), gen.sample(conds))
    assert {"target_mean", "target_unit", "start_noise"} <= set(gen.state_dict())


def test_concurrent_sampling_matches_sequential(trained):
    gen, _, conds, _, _ = trained
    chunks = conds.split(4)
    sequential = [gen.sample(c) for c in chunks]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(gen.sample, chunks))
    assert all(torch.equal(a, b) for a, b in zip(sequential, concurrent))


def test_bad_training_fails_clearly():
    conds, targets = task()
    hp = hparams(gen_epochs=3)
    gen = NeuronGenerator(P, C, hp)
    with pytest.raises(ValueError, match="NaN"):
        gen.train_on(conds, torch.arange(E), targets.index_fill(1, torch.tensor([3]), float("nan")), hp, progress=False)
    with pytest.raises(ValueError, match="noise schedule"):
        gen.train_on(conds, torch.arange(E), targets, hp.replace(gen_prediction_type="sample"), progress=False)
    with pytest.raises(RuntimeError, match="epoch 1/3"):
        gen.train_on(conds, torch.arange(E), targets, hp.replace(gen_lr=1e15, gen_batch_size=4), progress=False)


def test_min_steps_lengthens_training_for_small_edit_sets():
    conds, targets = task()  # E=16 samples at batch 16: one optimiser step per epoch
    hp = hparams(generator="mlp", gen_epochs=2, gen_min_steps=7)
    stats = NeuronGenerator(P, C, hp).train_on(conds, torch.arange(E), targets, hp, progress=False)
    assert stats["steps"] == 7
    hp = hparams(generator="mlp", gen_epochs=3, gen_min_steps=0)
    assert NeuronGenerator(P, C, hp).train_on(conds, torch.arange(E), targets, hp, progress=False)["steps"] == 3


def test_epochs_over_edits_see_each_edit_once_per_epoch():
    conds, targets = task()
    views = torch.cat([conds, conds + 0.01 * torch.randn(E, C), conds - 0.01 * torch.randn(E, C)])  # 3 rows an edit
    index = torch.arange(E).repeat(3)
    over_views = hparams(gen_epochs=2, gen_batch_size=8)
    assert NeuronGenerator(P, C, over_views).train_on(views, index, targets, over_views, progress=False)["steps"] == 12
    over_edits = over_views.replace(gen_epoch_unit="edits")
    gen = NeuronGenerator(P, C, over_edits)
    seen = []
    original = gen._loss
    gen._loss = lambda x0, cond, *a, **k: seen.append(cond.clone()) or original(x0, cond, *a, **k)
    assert gen.train_on(views, index, targets, over_edits, progress=False)["steps"] == 4  # 16 edits at batch 8, twice
    for epoch in (seen[:2], seen[2:]):  # each epoch: one row of every edit
        rows = torch.cat(epoch)
        match = (rows[:, None, :] == views[None]).all(-1).float().argmax(1)  # (16,) row of views each came from
        assert sorted(index[match].tolist()) == list(range(E))


def test_held_out_curve_is_recorded_without_changing_training():
    conds, targets = task()
    hp = hparams(gen_epochs=6, checkpoint_gen_epochs=2)
    held = (conds[:4] + 0.01, torch.arange(4))
    plain, watched = NeuronGenerator(P, C, hp), NeuronGenerator(P, C, hp)
    plain.train_on(conds, torch.arange(E), targets, hp, progress=False)
    stats = watched.train_on(conds, torch.arange(E), targets, hp, progress=False, held_out=held)
    assert all(torch.equal(v, watched.state_dict()[k]) for k, v in plain.state_dict().items())
    assert [p["epoch"] for p in stats["curve"]] == [2, 4, 6]
    assert all(0 < p["held_out_error"] < 2 for p in stats["curve"])


def test_stop_patience_ends_training_when_held_out_error_stalls():
    conds, targets = task()
    held = (conds[:4], torch.arange(4))
    hp = hparams(gen_epochs=20, checkpoint_gen_epochs=1, gen_stop_patience=2, gen_stop_min_delta=10.0)  # never enough
    stats = NeuronGenerator(P, C, hp).train_on(conds, torch.arange(E), targets, hp, progress=False, held_out=held)
    assert stats["epochs"] == 3 and stats["steps"] == 3 and len(stats["curve"]) == 3
    hp = hp.replace(gen_stop_patience=0)  # off: all epochs
    stats = NeuronGenerator(P, C, hp).train_on(conds, torch.arange(E), targets, hp, progress=False, held_out=held)
    assert stats["epochs"] == 20


def kept_losses(column: str) -> list[float]:
    """One column of the generator loss curves kept from the 10,000-edit runs (one loss per epoch)."""
    import csv
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench/results/counterfact_meg_10k_lr4e-3_stopped/generator_loss.csv"
    with open(path) as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def first_rise(losses: list[float], window: int, ratio: float):
    return next((i for i in range(1, len(losses) + 1) if loss_rose(losses[:i], window, ratio)), None)


def test_divergence_check_stops_the_kept_10k_divergence_and_not_its_healthy_run():
    ratio = MeGHyperParams(model_name="x", layer=0).gen_diverge_ratio
    # 9,921 edits, one row each an epoch: a window of one epoch. gen_lr 4e-3 rose from 0.70 (epoch 44) to 0.97 (54)
    diverged = first_rise(kept_losses("loss_gen_lr_4e-3_448_epochs"), 1, ratio)
    assert diverged is not None and 45 <= diverged <= 60
    assert first_rise(kept_losses("loss_gen_lr_2e-3_320_epochs"), 1, ratio) is None
    assert first_rise(kept_losses("loss_gen_lr_4e-3_448_epochs"), 1, 0.0) is None  # 0: off


def test_divergence_check_averages_noisy_epochs():
    noisy = [1.0, 0.5, 0.8, 0.5, 0.8, 0.5, 0.8]  # a 60% swing every epoch, no upward trend
    assert first_rise(noisy, 1, 1.25) == 3
    assert first_rise(noisy, 2, 1.25) is None
    assert first_rise(noisy + [1.5, 1.5], 2, 1.25) == 8


def test_divergence_raises_before_the_diverged_state_is_saved(monkeypatch):
    import megedit.generator as generator_module

    class Saves:  # a checkpoint that records what is saved
        def __init__(self):
            self.epochs = []

        def has(self, name):
            return False

        def save_state(self, name, state):
            self.epochs.append(state["epoch"])

    # stands in for a real rise (the check itself is tested on the kept curves above): fires in epoch 3
    monkeypatch.setattr(generator_module, "loss_rose", lambda losses, window, ratio: ratio > 0 and len(losses) == 3)
    conds, targets = task()
    hp, saves = hparams(gen_epochs=5, checkpoint_gen_epochs=1), Saves()
    with pytest.raises(RuntimeError, match="rose to .* in epoch 3/5.*Lower gen_lr"):
        NeuronGenerator(P, C, hp).train_on(conds, torch.arange(E), targets, hp, progress=False, checkpoint=saves)
    assert saves.epochs == [1, 2]
    hp = hp.replace(gen_diverge_ratio=0.0)
    assert NeuronGenerator(P, C, hp).train_on(conds, torch.arange(E), targets, hp, progress=False)["epochs"] == 5
