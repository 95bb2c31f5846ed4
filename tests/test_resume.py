"""Long runs survive: a run killed (SIGKILL) mid-fitting and again mid-generator-training resumes from its
checkpoints, redoes nothing already saved, and ends exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megedit.meg_main import train_meg

from resume_worker import resume_hparams
from tiny_meg import (EDITS, by_stage, count_stage_calls, stage_dir, states_equal, tiny_base, tiny_hparams,
                      without_seconds)

WORKER = Path(__file__).resolve().parent / "resume_worker.py"


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def killed_run(folder: Path, kill_at: str) -> Counter:
    """Run the worker until it kills itself at ``kill_at``; the events it got through."""
    log = folder / f"events-{kill_at.replace(':', '-')}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(WORKER), str(folder), kill_at, str(log)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    return Counter(log.read_text().split())


def in_process_run(folder: Path, monkeypatch, hp):
    events = Counter()
    count_stage_calls(monkeypatch.setattr, lambda event: events.update([event]))
    model, tok = tiny_base()
    edit, report = train_meg(model, tok, EDITS, hp, progress=False)
    monkeypatch.undo()
    return edit, report, events


def test_killed_twice_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    hp = resume_hparams(tmp_path)
    chunks = len(EDITS) // hp.fit_batch_edits  # 4 chunks of one edit
    reference, ref_report, ref_events = in_process_run(tmp_path, monkeypatch, tiny_hparams(tmp_path))  # no checkpoints
    steps_per_epoch = ref_report["generator"]["steps"] // hp.gen_epochs
    assert ref_events == {"encoder": 1, "embed": 1, "familiarity": 1, "fit": chunks,
                          "gen": hp.gen_epochs * steps_per_epoch}

    # 1st run: killed inside the 3rd chunk of neurons
    events = killed_run(tmp_path, "fit:3")
    assert events == {"encoder": 1, "embed": 1, "familiarity": 1, "fit": 3}
    (run_dir,) = (tmp_path / "checkpoints").iterdir()  # one folder per run
    neurons = stage_dir(run_dir, "stage3_neurons") / "neurons"
    assert sorted(p.name for p in neurons.iterdir()) == ["from_000000.safetensors", "from_000001.safetensors"]
    assert not (stage_dir(run_dir, "stage4_generator") / "generator.pt").exists()
    spent_1 = by_stage(json.loads((run_dir / "seconds.json").read_text()))  # what the killed process's saved work cost
    assert set(spent_1) == {"stage1_encoder", "embed", "stage2_familiarity", "stage3_neurons"}

    # 2nd run: stages 1-2 and two chunks come from the checkpoint; killed in the 6th generator epoch (saved at 4)
    kill_step = 5 * steps_per_epoch + 1
    events = killed_run(tmp_path, f"gen:{kill_step}")
    assert events == {"fit": chunks - 2, "gen": kill_step}  # no encoder, embedding, gate or chunk done twice
    assert torch.load(stage_dir(run_dir, "stage4_generator") / "generator.pt", weights_only=True)["epoch"] == 4

    # 3rd run, finishes: only the generator's epochs 5.. are trained
    edit, report, events = in_process_run(tmp_path, monkeypatch, hp)
    assert events == {"gen": (hp.gen_epochs - 4) * steps_per_epoch}
    for part in ("encoder", "familiarity", "generator"):
        assert states_equal(getattr(edit, part), getattr(reference, part)), part
    assert report.pop("checkpoint") == str(run_dir)
    assert report.pop("resumed") is True and "resumed" not in ref_report
    spent = by_stage(json.loads((run_dir / "seconds.json").read_text()))
    assert spent["stage3_neurons"] > spent_1["stage3_neurons"]  # the 2nd process's chunks were added to the 1st's
    for stage, seconds in spent.items():  # each stage reports every process's saved time, not this process's alone
        assert report["seconds"][stage] >= seconds
    # the generator's held-out curve is recorded at the saving cadence (checkpoint_gen_epochs), which differs here
    assert report["generator"].pop("curve")[-1] == ref_report["generator"].pop("curve")[-1]
    assert without_seconds(report) == without_seconds(ref_report)

    # a finished run is all in its checkpoint: running it again trains nothing
    again, _, events = in_process_run(tmp_path, monkeypatch, hp)
    assert events == {} and states_equal(again.generator, reference.generator)
    assert not list(run_dir.rglob(".*tmp-*"))  # no temporary left behind by the kills


def test_another_run_never_reuses_these_checkpoints(tmp_path, monkeypatch):
    """Checkpoints are keyed by requests + hparams + base model: a different run starts from scratch."""
    hp = resume_hparams(tmp_path)
    _, _, first = in_process_run(tmp_path, monkeypatch, hp)
    _, _, other_seed = in_process_run(tmp_path, monkeypatch, hp.replace(seed=1))
    assert first["fit"] == other_seed["fit"] == len(EDITS) and other_seed["encoder"] == 1
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2
    _, _, resaved = in_process_run(tmp_path, monkeypatch, hp.replace(checkpoint_gen_epochs=3))  # saving cadence only
    assert resaved == {}


def test_run_key_reads_what_training_reads(monkeypatch):
    """The keys follow what training reads: EasyEdit-built and megedit-built dicts of the same edits share them; a
    changed target, an evaluation prompt training must avoid, or a shared hparam gives another run key; a stage's own
    hparams change that stage's key and the keys of the stages that read its work, and no other."""
    from megedit.checkpoint import ADDED_FIELDS, run_keys
    from megedit.hparams import MeGHyperParams

    hp, base = MeGHyperParams(model_name="tiny", layer=1), {"model": "tiny"}
    ours = [{**r, "case_id": 10 + i} for i, r in enumerate(EDITS)]
    easyedit = [{k: v for k, v in r.items() if k != "case_id"} | {"portability": {}} for r in EDITS]
    run, stages, _ = run_keys(ours, hp, base)
    assert run_keys(easyedit, hp, base)[:2] == (run, stages)
    sampling_only = hp.replace(batch_size=64, max_length=512, sample_steps=10, sample_scheduler="ddpm")
    assert run_keys(ours, sampling_only, base)[:2] == (run, stages)
    for changed in (hp.replace(layer=2), hp.replace(n_paraphrase_views=hp.n_paraphrase_views + 1)):
        assert run_keys(ours, changed, base)[0] != run
    assert run_keys([{**ours[0], "target_new": "Oslo"}, *ours[1:]], hp, base)[0] != run
    assert run_keys([{**ours[0], "rephrase_prompt": "Where is it?"}, *ours[1:]], hp, base)[0] != run

    def changed_stages(**change):
        other_run, other = run_keys(ours, hp.replace(**change), base)[:2]
        assert other_run == run
        return {s for s in stages if other[s] != stages[s]}

    assert changed_stages(encoder_lr=1e-4) == {"stage1_encoder", "embed", "stage2_familiarity", "stage4_generator"}
    assert changed_stages(familiarity_epochs=7) == {"stage2_familiarity"}
    assert changed_stages(fit_steps=hp.fit_steps + 1) == {"stage3_neurons", "stage4_generator"}
    assert changed_stages(gen_epochs=7) == changed_stages(dit_depth=5) == {"stage4_generator"}
    assert changed_stages(fit_init="gradient") == {"stage3_neurons", "stage4_generator"}

    # a field added to the hparams after a checkpoint was written leaves that checkpoint's keys as they were while
    # it holds the value that trains as before: a megedit without the field computed the same keys
    for field, neutral in ADDED_FIELDS.items():
        assert getattr(MeGHyperParams(model_name="x", layer=1), field) == neutral, field  # the default trains as before
    older = hp.to_dict()
    for field in ADDED_FIELDS:
        del older[field]
    monkeypatch.setattr(type(hp), "to_dict", lambda self: dict(older))
    assert run_keys(ours, hp, base)[:2] == (run, stages)


def test_new_generator_settings_reuse_the_earlier_stages(tmp_path, monkeypatch):
    """A run that changes only the generator's settings trains the generator alone, and ends where a run with those
    settings from scratch ends."""
    hp = resume_hparams(tmp_path)
    in_process_run(tmp_path, monkeypatch, hp)
    more = hp.replace(gen_epochs=hp.gen_epochs + 2)
    edit, report, events = in_process_run(tmp_path, monkeypatch, more)
    assert set(events) == {"gen"} and report["resumed"] is True
    fresh, _, _ = in_process_run(tmp_path / "fresh", monkeypatch, more.replace(checkpoint_dir=None))
    for part in ("encoder", "familiarity", "generator"):
        assert states_equal(getattr(edit, part), getattr(fresh, part)), part
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    assert len(list(run_dir.glob("stage4_generator-*"))) == 2 and len(list(run_dir.glob("stage3_neurons-*"))) == 1


def test_damaged_checkpoints_are_named_and_recomputed(tmp_path, monkeypatch, caplog):
    """Two flipped bytes in a chunk of neurons and a truncated embeddings file: resuming names each damaged stage,
    refits that chunk alone, re-embeds, and ends where the undamaged run ended (it never reads a damaged file)."""
    hp = resume_hparams(tmp_path)
    reference, _, _ = in_process_run(tmp_path, monkeypatch, hp)
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    chunk = stage_dir(run_dir, "stage3_neurons") / "neurons" / "from_000001.safetensors"
    data = bytearray(chunk.read_bytes())
    data[-8] ^= 0xFF
    data[-3] ^= 0x01
    chunk.write_bytes(bytes(data))
    embeddings = stage_dir(run_dir, "embed") / "embeddings.safetensors"
    embeddings.write_bytes(embeddings.read_bytes()[:100])

    with caplog.at_level("WARNING", logger="megedit.checkpoint"):
        edit, _, events = in_process_run(tmp_path, monkeypatch, hp)
    assert events == {"embed": 1, "fit": 1}  # the other chunks, the encoder, the gate and the generator are kept
    warnings = caplog.text
    assert "checkpoint stage embed" in warnings and "embeddings.safetensors does not match the hash" in warnings
    assert "checkpoint stage stage3_neurons" in warnings and "neurons/from_000001.safetensors" in warnings
    for part in ("encoder", "familiarity", "generator"):
        assert states_equal(getattr(edit, part), getattr(reference, part)), part
    again, _, events = in_process_run(tmp_path, monkeypatch, hp)  # the recomputed files were recorded again
    assert events == {}


def test_a_damaged_stage_file_recomputes_the_whole_stage(tmp_path, monkeypatch, caplog):
    """The generator's training state has no independent parts: one damaged byte retrains the generator."""
    hp = resume_hparams(tmp_path)
    reference, ref_report, _ = in_process_run(tmp_path, monkeypatch, hp)
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    state = stage_dir(run_dir, "stage4_generator") / "generator.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="megedit.checkpoint"):
        edit, _, events = in_process_run(tmp_path, monkeypatch, hp)
    assert set(events) == {"gen"} and "checkpoint stage stage4_generator" in caplog.text
    assert "recomputing the stage" in caplog.text
    assert states_equal(edit.generator, reference.generator)
