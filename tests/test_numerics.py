"""NaN/inf never slips through: a neuron fit that blows up is reported by case_id and left out; a diverging generator
stops with a clear message before its state is checkpointed; a broken edit is never saved (test_artifact.py)."""
import pytest
import torch

from megedit.meg_main import build_texts, load_pool, train_meg

from tiny_meg import EDITS, stage_dir, tiny_base, tiny_hparams

POISONED = 2  # index in EDITS of the edit whose neuron fit is made to blow up


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def poison_one_edit(model, tok, hp):
    """NaN embeddings for the tokens that only edit POISONED's fitting texts contain: its loss turns NaN, others not."""
    texts = build_texts(EDITS, load_pool(EDITS, hp), hp)
    tokens = [set(tok(" ".join(v) + " " + r["target_new"])["input_ids"]) for v, r in zip(texts.views, EDITS)]
    own = tokens[POISONED].difference(*(t for e, t in enumerate(tokens) if e != POISONED))
    assert own
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(own)] = float("nan")


def test_a_nan_neuron_fit_is_reported_by_case_id_and_left_out(tmp_path):
    hp = tiny_hparams(tmp_path, fit_batch_edits=len(EDITS))  # all edits in one batch: the NaN must stay in its row
    model, tok = tiny_base()
    poison_one_edit(model, tok, hp)
    edit, report = train_meg(model, tok, EDITS, hp, progress=False)
    case = EDITS[POISONED]["case_id"]
    assert report["fit"]["nonfinite_case_ids"] == [case]
    assert case in report["fit"]["failed_case_ids"]
    assert report["fit"]["ok"] < 1.0
    assert all(torch.isfinite(t).all() for t in edit.generator.state_dict().values())  # trained on the others only
    edit.save_pretrained(tmp_path / "edit")  # and the edit can be kept


def test_no_neuron_fit_at_all_stops_with_the_case_ids(tmp_path):
    model, tok = tiny_base()
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("inf"))
    with pytest.raises(RuntimeError, match=r"no neuron fit reproduced its target \(case_ids \[10, 11, 12, 13\]; 4 of them "
                                           r"gave NaN/inf: check the model's weights or lower fit_lr\)"):
        train_meg(model, tok, EDITS, tiny_hparams(tmp_path), progress=False)


def test_a_diverging_generator_stops_before_any_checkpoint(tmp_path):
    hp = tiny_hparams(tmp_path, gen_lr=1e15, checkpoint_dir=str(tmp_path / "ck"), checkpoint_gen_epochs=1)
    model, tok = tiny_base()
    with pytest.raises(RuntimeError, match=r"generator training diverged: loss nan in epoch \d/8 .*lower gen_lr") as e:
        train_meg(model, tok, EDITS, hp, progress=False)
    diverged = int(str(e.value).split("epoch ")[1].split("/")[0])
    (run_dir,) = (tmp_path / "ck").iterdir()
    saved_generator = stage_dir(run_dir, "stage4_generator") / "generator.pt"
    assert (stage_dir(run_dir, "stage3_neurons") / "neurons").exists() and saved_generator.exists() == (diverged > 1)
    if diverged > 1:  # the last checkpoint is the last finite epoch
        saved = torch.load(saved_generator, weights_only=True)
        assert saved["epoch"] == diverged - 1 and all(torch.isfinite(t).all() for t in saved["net"].values())
