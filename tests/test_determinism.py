"""Same seed and inputs give the same run on CPU: fitted neurons, gate, generator, report and metrics."""
import pytest
import torch

import megedit.meg_main as meg_main
from megedit.evaluate import evaluate_requests, locality_reference
from megedit.fitting import fit_neurons
from megedit.meg_main import apply_meg_to_model

from tiny_meg import EDITS, states_equal, tiny_base, tiny_hparams, without_seconds


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def run(folder, monkeypatch, seed: int) -> dict:
    """One whole MeG run on a fresh tiny llama; what it fitted, learned, reported and scored."""
    fits = []
    monkeypatch.setattr(meg_main, "fit_neurons", lambda *a, **k: fits.append(fit_neurons(*a, **k)) or fits[-1])
    model, tok = tiny_base()
    reference = locality_reference(model, tok, EDITS, 8)
    edited, _ = apply_meg_to_model(model, tok, EDITS, tiny_hparams(folder, seed=seed), progress=False)
    metrics = evaluate_requests(edited, tok, EDITS, reference, 8, progress=False)
    return {"fit": fits[0], "edit": edited.edit, "report": without_seconds(edited.report), "metrics": metrics}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("determinism")
    with pytest.MonkeyPatch.context() as mp:
        return [run(folder, mp, seed) for seed in (0, 0, 1)]


def test_same_seed_same_run(runs):
    a, b, _ = runs
    assert torch.equal(a["fit"].weights, b["fit"].weights) and torch.equal(a["fit"].ok, b["fit"].ok)
    for part in ("encoder", "familiarity", "generator"):
        assert states_equal(getattr(a["edit"], part), getattr(b["edit"], part)), part
    assert a["report"] == b["report"]
    assert a["metrics"] == b["metrics"]
    assert a["report"]["seed"] == 0


def test_another_seed_another_run(runs):
    """The comparison above can fail: a different seed changes the neurons and the generator."""
    a, _, c = runs
    assert not torch.equal(a["fit"].weights, c["fit"].weights)
    assert not states_equal(a["edit"].generator, c["edit"].generator)
    assert c["report"]["seed"] == 1
