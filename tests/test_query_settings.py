"""Query-time settings of an edited model (``QuerySettings``): the generator's sampling steps and the gate's
thresholds, given to ``MeGModel`` or ``MeGModel.from_pretrained``, change how queries are answered and never the edit."""
import math

import pytest
import torch

from megedit.encoder import embed
from megedit.model import GATE_OFF, MeGModel, QuerySettings

from tiny_meg import EDITS, UNRELATED, saved_tiny_edit, states_equal, tiny_base

pytestmark = pytest.mark.usefixtures("single_thread")
TEXTS = [EDITS[0]["prompt"], UNRELATED[0], EDITS[2]["prompt"], UNRELATED[1]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    edited, tok, folder = saved_tiny_edit(tmp_path_factory.mktemp("query"))
    edited.unload()
    return edited.edit, tok, folder


def routed(edited: MeGModel, tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return edited.route(enc["input_ids"], enc["attention_mask"])


def test_defaults_are_the_edits_own(saved):
    edit, tok, _ = saved
    model, _ = tiny_base()
    plain = routed(MeGModel(model, tok, edit), tok)
    explicit = routed(MeGModel(model, tok, edit, sample_steps=edit.hparams.sample_steps,
                               epsilon=float(edit.familiarity.epsilon), tau=float(edit.familiarity.tau)), tok)
    assert plain.rows.tolist() == explicit.rows.tolist() == [0, 2]
    assert torch.equal(plain.weights, explicit.weights)


def test_sample_steps_changes_the_generated_weights_not_the_edit(saved):
    edit, tok, _ = saved
    model, _ = tiny_base()
    before = {k: v.clone() for k, v in edit.state_dict().items()}
    steps = edit.hparams.sample_steps + 3
    route = routed(MeGModel(model, tok, edit, sample_steps=steps), tok)
    emb = embed(edit.encoder, [TEXTS[i] for i in route.rows.tolist()])
    assert torch.equal(route.weights, edit.generator.sample(emb, steps=steps))
    assert not torch.equal(route.weights, edit.generator.sample(emb))
    assert edit.generator.sample_steps == edit.hparams.sample_steps
    assert all(torch.equal(before[k], v) for k, v in edit.state_dict().items())


def test_gate_thresholds(saved):
    edit, tok, _ = saved
    model, _ = tiny_base()
    assert routed(MeGModel(model, tok, edit, settings=GATE_OFF), tok).rows.tolist() == [0, 1, 2, 3]
    assert routed(MeGModel(model, tok, edit, tau=1.5), tok).rows.tolist() == []  # no cosine similarity reaches 1.5
    assert routed(MeGModel(model, tok, edit, epsilon=0.0), tok).rows.tolist() == []  # no entropy is below 0
    assert float(edit.familiarity.tau) < 1.5 and float(edit.familiarity.epsilon) > 0.0  # the edit kept its own


def test_settings_can_be_replaced_on_the_edited_model(saved):
    edit, tok, _ = saved
    model, _ = tiny_base()
    edited = MeGModel(model, tok, edit)
    edited.settings = GATE_OFF
    assert routed(edited, tok).rows.tolist() == [0, 1, 2, 3]
    edited.settings = QuerySettings()
    assert routed(edited, tok).rows.tolist() == [0, 2]


def test_from_pretrained_takes_the_settings(saved):
    edit, tok, folder = saved
    model, _ = tiny_base()
    edited = MeGModel.from_pretrained(model, tok, folder, sample_steps=5, epsilon=math.inf, tau=-math.inf)
    assert edited.settings == QuerySettings(sample_steps=5, epsilon=math.inf, tau=-math.inf)
    assert routed(edited, tok).rows.tolist() == [0, 1, 2, 3]
    assert states_equal(edited.edit.generator, edit.generator)
    edited.unload()
    again = MeGModel.from_pretrained(model, tok, folder, settings=QuerySettings(sample_steps=5))
    assert again.settings.sample_steps == 5 and again.settings.epsilon is None
    again.unload()


def test_bad_settings_are_refused(saved):
    edit, tok, _ = saved
    model, _ = tiny_base()
    with pytest.raises(ValueError, match="sample_steps must be a positive integer"):
        MeGModel(model, tok, edit, sample_steps=0)
    with pytest.raises(ValueError, match="epsilon must be a number"):
        QuerySettings(epsilon=float("nan"))
    with pytest.raises(ValueError, match="either settings or sample_steps"):
        MeGModel(model, tok, edit, settings=GATE_OFF, sample_steps=3)
