"""Stage 2: the familiarity gate on synthetic embeddings (clusters of edit views, near misses, far-away points)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from megedit.familiarity import FamiliarityNet, choose_thresholds, gate_rates, train_familiarity
from megedit.hparams import MeGHyperParams

DIM, EDITS, CLASSES = 32, 6, 4


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def hparams(**kw):
    return MeGHyperParams(**{"model_name": "x", "layer": 0, "familiarity_classes": CLASSES, "familiarity_hidden": 64,
                             "familiarity_blocks": 1, "familiarity_epochs": 40, "familiarity_batch_size": 32,
                             "familiarity_lr": 3e-3, **kw})


def synthetic(seed: int = 0):
    """Unit vectors: EDITS cluster centres; views = centre + small noise; near misses = centre + a large orthogonal
    step (cosine ~0.5 to the centre); far points = random directions."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(EDITS, DIM, generator=g), dim=1)

    def around(scale, n):
        c = centres.repeat_interleave(n, 0)
        noise = torch.randn(len(c), DIM, generator=g)
        noise = noise - (noise * c).sum(1, keepdim=True) * c  # orthogonal to the centre
        return F.normalize(c + scale * F.normalize(noise, dim=1), dim=1)

    views = {"train": around(0.15, 8), "calib": around(0.15, 3), "test": around(0.15, 3)}
    near = {"train": around(1.8, 8), "calib": around(1.8, 4), "test": around(1.8, 2)}
    far = {k: F.normalize(torch.randn(n, DIM, generator=g), dim=1) for k, n in (("calib", 30), ("test", 12))}
    return centres, views, near, far


def trained_gate(seed: int = 0):
    centres, views, near, far = synthetic()
    hp = hparams(seed=seed)
    torch.manual_seed(seed)
    net = FamiliarityNet(DIM, hp.familiarity_hidden, hp.familiarity_blocks, CLASSES, n_keys=len(views["train"]))
    net.keys.copy_(views["train"].half())
    labels = torch.randint(CLASSES, (EDITS,), generator=torch.Generator().manual_seed(seed)).repeat_interleave(8)
    stats = train_familiarity(net, views["train"], labels, near["train"], hp, progress=False)
    chosen = choose_thresholds(net, views["calib"], {"near": near["calib"], "far": far["calib"]})
    return net, stats, chosen, (centres, views, near, far)


@pytest.fixture(scope="module")
def gate():
    return trained_gate()


def test_gate_separates_views_from_near_misses_and_far_points(gate):
    net, stats, chosen, (_, views, near, far) = gate
    assert math.isfinite(stats["loss"]) and stats["positives"] == EDITS * 8 and stats["negatives"] == EDITS * 8
    assert not net.training
    assert chosen["balanced_accuracy"] == 1.0
    assert float(net.epsilon) == pytest.approx(chosen["epsilon"]) and float(net.tau) == pytest.approx(chosen["tau"])
    assert net.familiar(views["test"]).all()  # held-out points of the edits' clusters
    assert not net.familiar(near["test"]).any()
    assert not net.familiar(far["test"]).any()
    rates = gate_rates(net, views["test"], {"near": near["test"], "far": far["test"]})
    assert rates == {"familiar_pass": 1.0, "near_blocked": 1.0, "far_blocked": 1.0}


def test_entropy_is_what_separates_near_misses(gate):
    """Outlier exposure: near misses get high entropy (not only a low similarity to the keys)."""
    net, _, _, (_, views, near, _) = gate
    assert net.entropy(views["test"]).max() < net.entropy(near["test"]).min()


def test_far_points_are_caught_by_the_similarity_guard(gate):
    """With the entropy gate wide open (a fixed epsilon above ln K), only tau can keep far points out: the search
    must find a tau that blocks them and still passes every view."""
    net, _, _, (_, views, _, far) = gate
    net = copy.deepcopy(net)
    chosen = choose_thresholds(net, views["calib"], {"far": far["calib"]}, fixed_epsilon=math.log(CLASSES) + 1)
    assert chosen["tau"] > 0.5 and chosen["familiar_pass"] == 1.0 and chosen["near_miss_blocked"] == {"far": 1.0}
    assert not net.familiar(far["test"]).any()
    # tau is a low quantile of the calibration views' similarity: a held-out view may fall just under it
    assert net.familiar(views["test"]).float().mean() >= 0.9


def test_nearest_similarity_with_and_without_keys():
    g = torch.Generator().manual_seed(3)
    keys = F.normalize(torch.randn(5, DIM, generator=g), dim=1)
    queries = F.normalize(torch.randn(7, DIM, generator=g), dim=1)
    empty = FamiliarityNet(DIM, 8, 1, CLASSES)
    assert torch.equal(empty.nearest_similarity(queries), torch.ones(7))  # no keys: the guard lets everything by
    net = FamiliarityNet(DIM, 8, 1, CLASSES, n_keys=5)
    net.keys.copy_(keys.half())
    expected = torch.tensor([max(float(q @ k) for k in keys.half().float()) for q in queries])
    torch.testing.assert_close(net.nearest_similarity(queries), expected)
    torch.testing.assert_close(net.nearest_similarity(queries, chunk=2), expected)  # chunked = whole
    torch.testing.assert_close(net.nearest_similarity(keys), torch.ones(5), atol=2e-3, rtol=0)  # fp16 keys


def test_gate_needs_epsilon():
    net = FamiliarityNet(DIM, 8, 1, CLASSES)
    with pytest.raises(RuntimeError, match="epsilon"):
        net.familiar(torch.zeros(1, DIM))
    net.epsilon.fill_(math.log(CLASSES) + 1)  # above the largest possible entropy: everything is familiar
    assert net.familiar(F.normalize(torch.randn(3, DIM), dim=1)).all()


def test_fixed_epsilon_is_kept(gate):
    net, _, _, (_, views, near, far) = gate
    net = copy.deepcopy(net)
    chosen = choose_thresholds(net, views["calib"], {"near": near["calib"]}, fixed_epsilon=0.123)
    assert chosen["epsilon"] == pytest.approx(0.123) and float(net.epsilon) == pytest.approx(0.123)


def test_training_and_thresholds_are_deterministic(gate):
    net, stats, chosen, _ = gate
    net2, stats2, chosen2, _ = trained_gate()
    assert stats["loss"] == stats2["loss"] and chosen == chosen2
    state, state2 = net.state_dict(), net2.state_dict()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    net3, stats3, _, _ = trained_gate(seed=1)
    assert stats3["loss"] != stats["loss"]


def test_training_interrupted_after_an_epoch_resumes_to_the_same_gate(tmp_path):
    """A run killed between epochs (here: its 4th save raises) resumes from the last saved epoch and ends with the
    parameters of an uninterrupted run, bit for bit."""
    from megedit.checkpoint import RunCheckpoint

    _, views, near, _ = synthetic()
    hp = hparams(familiarity_epochs=6)
    labels = torch.randint(CLASSES, (EDITS,), generator=torch.Generator().manual_seed(0)).repeat_interleave(8)

    def fresh_net():
        torch.manual_seed(0)
        return FamiliarityNet(DIM, hp.familiarity_hidden, hp.familiarity_blocks, CLASSES)

    reference = fresh_net()
    ref_stats = train_familiarity(reference, views["train"], labels, near["train"], hp, progress=False)

    ckpt = RunCheckpoint(tmp_path, {"stage2_familiarity": "key"})
    ckpt.begin("stage2_familiarity")
    real_save, saves = ckpt.save_state, []

    def save_then_die(name, state):
        saves.append(state["epoch"])
        if len(saves) == 4:
            raise KeyboardInterrupt  # the process stops before epoch 4's state is written
        real_save(name, state)

    ckpt.save_state = save_then_die
    with pytest.raises(KeyboardInterrupt):
        train_familiarity(fresh_net(), views["train"], labels, near["train"], hp, progress=False, checkpoint=ckpt)
    assert torch.load(ckpt.path("familiarity.pt"), weights_only=True)["epoch"] == 3

    resumed_epochs = []
    ckpt.save_state = lambda name, state: (resumed_epochs.append(state["epoch"]), real_save(name, state))
    resumed = fresh_net()
    stats = train_familiarity(resumed, views["train"], labels, near["train"], hp, progress=False, checkpoint=ckpt)
    assert resumed_epochs == [4, 5, 6]  # epochs 1-3 came from the checkpoint
    assert stats["loss"] == ref_stats["loss"]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)  # epsilon is NaN until chosen


def _train(hp, calibration=None):
    centres, views, near, far = synthetic()
    torch.manual_seed(hp.seed)
    net = FamiliarityNet(DIM, hp.familiarity_hidden, hp.familiarity_blocks, CLASSES, n_keys=len(views["train"]))
    net.keys.copy_(views["train"].half())
    labels = torch.randint(CLASSES, (EDITS,), generator=torch.Generator().manual_seed(hp.seed)).repeat_interleave(8)
    stats = train_familiarity(net, views["train"], labels, near["train"], hp, progress=False, calibration=calibration)
    return net, stats


def test_held_out_curve_changes_no_weight_and_patience_stops_early():
    _, views, near, far = synthetic()
    calibration = (views["calib"], {"near": near["calib"], "far": far["calib"]})
    plain, plain_stats = _train(hparams(familiarity_epochs=6))
    watched, stats = _train(hparams(familiarity_epochs=6, familiarity_curve=True), calibration)
    assert all(torch.equal(v, watched.state_dict()[k]) for k, v in plain.state_dict().items() if k not in
               ("epsilon", "tau"))  # the per-epoch choice sets the thresholds; the caller chooses them again
    assert "curve" not in plain_stats and [c["epoch"] for c in stats["curve"]] == list(range(1, 7))
    assert all(0 <= c["balanced_accuracy"] <= 1 for c in stats["curve"])
    # an improvement of 2 is never reached: stop after the first epoch plus `patience` epochs without progress
    hp = hparams(familiarity_epochs=30, familiarity_curve=True, familiarity_patience=2, familiarity_min_delta=2.0)
    _, stopped = _train(hp, calibration)
    assert stopped["epochs"] == 3 and len(stopped["curve"]) == 3
    with pytest.raises(ValueError, match="familiarity_curve"):
        hparams(familiarity_patience=2)
