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
from tiny_meg import EDITS, count_stage_calls, states_equal, tiny_base, tiny_hparams, without_seconds

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
    assert ref_events == {"encoder": 1, "familiarity": 1, "fit": chunks, "gen": hp.gen_epochs * steps_per_epoch}

    # 1st run: killed inside the 3rd chunk of neurons
    events = killed_run(tmp_path, "fit:3")
    assert events == {"encoder": 1, "familiarity": 1, "fit": 3}
    (run_dir,) = (tmp_path / "checkpoints").iterdir()  # one folder per run
    assert sorted(p.name for p in (run_dir / "neurons").iterdir()) == ["from_000000.safetensors",
                                                                      "from_000001.safetensors"]
    assert not (run_dir / "generator.pt").exists()
    spent_1 = json.loads((run_dir / "seconds.json").read_text())  # what the saved work cost the killed process
    assert set(spent_1) == {"stage1_encoder", "stage2_familiarity", "stage3_neurons"}

    # 2nd run: stages 1-2 and two chunks come from the checkpoint; killed in the 6th generator epoch (saved at 4)
    kill_step = 5 * steps_per_epoch + 1
    events = killed_run(tmp_path, f"gen:{kill_step}")
    assert events == {"fit": chunks - 2, "gen": kill_step}  # no encoder, no familiarity, no chunk fitted twice
    assert torch.load(run_dir / "generator.pt", weights_only=True)["epoch"] == 4

    # 3rd run, finishes: only the generator's epochs 5.. are trained
    edit, report, events = in_process_run(tmp_path, monkeypatch, hp)
    assert events == {"gen": (hp.gen_epochs - 4) * steps_per_epoch}
    for part in ("encoder", "familiarity", "generator"):
        assert states_equal(getattr(edit, part), getattr(reference, part)), part
    assert report.pop("checkpoint") == str(run_dir)
    assert report.pop("resumed") is True and "resumed" not in ref_report
    spent = json.loads((run_dir / "seconds.json").read_text())
    assert spent["stage3_neurons"] > spent_1["stage3_neurons"]  # the 2nd process's chunks were added to the 1st's
    for stage, seconds in spent.items():  # each stage reports every process's saved time, not this process's alone
        assert report["seconds"][stage] >= seconds
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


def test_run_key_reads_what_training_reads():
    """The key follows what training reads: EasyEdit-built and megedit-built dicts of the same edits share it; a
    changed target, an evaluation prompt training must avoid, or a training hparam gives another."""
    from megedit.checkpoint import run_key
    from megedit.hparams import MeGHyperParams

    hp, base = MeGHyperParams(model_name="tiny", layer=1), {"model": "tiny"}
    ours = [{**r, "case_id": 10 + i} for i, r in enumerate(EDITS)]
    easyedit = [{k: v for k, v in r.items() if k != "case_id"} | {"portability": {}} for r in EDITS]
    key = run_key(ours, hp, base)[0]
    assert run_key(easyedit, hp, base)[0] == key
    assert run_key(ours, hp.replace(batch_size=64, max_length=512), base)[0] == key  # EasyEdit-only settings
    assert run_key(ours, hp.replace(fit_steps=hp.fit_steps + 1), base)[0] != key
    assert run_key([{**ours[0], "target_new": "Oslo"}, *ours[1:]], hp, base)[0] != key
    assert run_key([{**ours[0], "rephrase_prompt": "Where is it?"}, *ours[1:]], hp, base)[0] != key
