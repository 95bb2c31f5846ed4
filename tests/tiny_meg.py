"""A whole MeG run in seconds: a tiny llama, four CounterFact edits, a 300-record pseudo-edit pool, tiny stages.

Used by the robustness tests (artifact, restore, determinism, resume, numerics) and by ``resume_worker.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megedit.hparams import MeGHyperParams

from conftest import load_gpt2_tokenizer, tiny_model
from test_data import data_dir

# single-token answers (for the GPT-2 tokenizer), so that a 40-step fit on a tiny model reproduces them
EDITS = [
    {"case_id": 10, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "rephrase_prompt": "Danielle Darrieux grew up speaking",
     "locality": {"neighborhood": {"prompt": "The mother tongue of Jean Gabin is", "ground_truth": "French"}}},
    {"case_id": 11, "prompt": "The official religion of Edwin of Northumbria is", "subject": "Edwin of Northumbria",
     "target_new": "Islam", "locality": {}},
    {"case_id": 12, "prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
     "locality": {"neighborhood": {"prompt": "John Lennon plays the", "ground_truth": "guitar"}}},
    {"case_id": 13, "prompt": "Apple A5 was created by", "subject": "Apple A5", "target_new": "Google",
     "locality": {}},
]
UNRELATED = ["The weather in Oslo today is quite", "Paris is the capital of"]
LAYER = 1


def pool_file(folder: Path) -> Path:
    """The first 300 records of CounterFact's training split (disjoint from the edits above)."""
    path = folder / "pool.json"
    if not path.exists():
        records = json.loads((data_dir() / "counterfact" / "counterfact-train.json").read_text())[:300]
        path.write_text(json.dumps(records))
    return path


def tiny_hparams(folder: Path, **changes) -> MeGHyperParams:
    return MeGHyperParams(**{
        "model_name": "tiny-llama", "layer": LAYER, "pseudo_edit_data": str(pool_file(folder)),
        "n_paraphrase_views": 2, "n_prefix_views": 1, "n_near_misses": 1,
        "encoder_pairs": 16, "encoder_batch_size": 8, "encoder_trainable_layers": 1,
        "familiarity_hidden": 32, "familiarity_blocks": 1, "familiarity_epochs": 3, "familiarity_holdout": 2,
        "fit_steps": 40, "fit_batch_edits": 1,
        "gen_hidden": 32, "gen_depth": 1, "dit_heads": 2, "dit_patch_size": 16, "dit_mlp_ratio": 2.0,
        "gen_epochs": 8, "gen_batch_size": 16, "gen_lr": 3e-3, "sample_steps": 2, "eval_batch_size": 8,
        **changes})


def tiny_base():
    """A tiny random llama whose LM head is scaled up so that one neuron can make an answer confident."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    return model, load_gpt2_tokenizer()


def saved_tiny_edit(folder: Path):
    """A real MeG edit (all four stages) of ``EDITS`` on ``tiny_base``, saved to ``folder / "edit"``: (edited, tok,
    saved folder)."""
    from megedit.meg_main import apply_meg_to_model

    model, tok = tiny_base()
    edited, _ = apply_meg_to_model(model, tok, EDITS, tiny_hparams(folder), progress=False)
    return edited, tok, edited.save_pretrained(folder / "edit")


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def count_stage_calls(set_attribute, on_call) -> None:
    """Wrap each stage's unit of work so that ``on_call(event)`` runs first: "encoder" (stage 1), "embed" (every
    training text through the encoder), "familiarity" (stage 2), "fit" (one chunk of neurons), "gen" (one generator
    training step).

    ``set_attribute`` is ``setattr`` (in a worker process) or ``monkeypatch.setattr`` (in a test).
    """
    import megedit.fitting as fitting
    import megedit.meg_main as meg_main
    from megedit.generator import NeuronGenerator

    units = {"encoder": (meg_main, "tune_encoder"), "embed": (meg_main, "_embed_all"),
             "familiarity": (meg_main, "train_familiarity"),
             "fit": (fitting, "_fit_chunk"), "gen": (NeuronGenerator, "_loss")}
    for event, (owner, name) in units.items():
        real = getattr(owner, name)

        def wrapper(*args, _real=real, _event=event, **kwargs):
            on_call(_event)
            return _real(*args, **kwargs)

        set_attribute(owner, name, wrapper)


def without_seconds(report):
    """A report with every timing removed: what two equal runs must agree on."""
    if isinstance(report, dict):
        return {k: without_seconds(v) for k, v in report.items() if k != "seconds"}
    return report


def stage_dir(run_dir: Path, stage: str) -> Path:
    """The folder of ``stage``'s saved work inside a run's checkpoint (``<stage>-<key>``); the path even if unsaved."""
    found = sorted(run_dir.glob(f"{stage}-*"))
    assert len(found) <= 1, found
    return found[0] if found else run_dir / f"{stage}-unsaved"


def by_stage(spent: dict) -> dict:
    """seconds.json's ``{<stage>-<key>: seconds}`` as ``{stage: seconds}`` (one key per stage)."""
    return {folder.rsplit("-", 1)[0]: seconds for folder, seconds in spent.items()}
