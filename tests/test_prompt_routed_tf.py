"""megedit's teacher-forced metric routes a MeG model on the prompt alone, as generation does, then teacher-forces the
answer under that decision; the answer being scored never sways the gate."""
import torch

from megedit.evaluate import teacher_forced
from megedit.neuron import active_neurons
from megedit.text import encode_answered

from test_model_routing import EDIT, MIXED, batch, hooked, own_decision, parts, setup  # noqa: F401 (fixtures)

ANSWERS = ["English and French and German", "the piano and the violin", "France", "sunny"]


def test_teacher_forcing_uses_the_prompt_only_decision(parts, setup):
    edited, reference, tok = setup
    # the case: with its answer appended no prompt is close enough to a key (EasyEdit's pass: nothing routed), while
    # each edit prompt alone is familiar (generation's decision: rows 0 and 2 get their neuron)
    answered = [f"{p} {a}" for p, a in zip(MIXED, ANSWERS)]
    assert edited.edit.route(answered).rows.numel() == 0
    route = own_decision(parts, edited, batch(tok, MIXED), [0, 2])

    got = teacher_forced(edited, tok, MIXED, ANSWERS)
    with active_neurons(route):
        prompt_routed = teacher_forced(hooked(reference), tok, MIXED, ANSWERS)
    answer_routed = teacher_forced(reference, tok, MIXED, ANSWERS)  # routing on prompt + answer: the unedited model
    b = encode_answered(tok, MIXED, ANSWERS)
    with torch.no_grad():  # the edited model's own forward on prompt + answer routes on the answer too
        logits = edited(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert logits[b.answer_seq, b.answer_pos].argmax(-1).tolist() == [t for p, _ in answer_routed for t in p]

    assert got == prompt_routed
    assert got[1] == answer_routed[1] and got[3] == answer_routed[3]  # unfamiliar either way
    assert got[0] != answer_routed[0] and got[2] != answer_routed[2]  # the routes differ here: the prompt's wins
