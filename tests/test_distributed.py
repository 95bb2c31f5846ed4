"""Data parallelism: the tiny MeG run launched as 2 CPU processes (gloo) by ``accelerate launch`` fits the same neurons
and trains the same gate and generator as one process (up to float rounding in the averaged gradients), every rank
ends with the same edit, the work really was split, and rank 0's checkpoints resume the run in a single process;
``megedit edit`` under ``torchrun`` gives one process's results, printed and written once."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from dp_worker import dp_hparams, run
from megedit import distributed
from megedit.cli import main as megedit_main
from test_cli import edits_file, tiny_model_dir, tiny_yaml
from tiny_meg import EDITS, pool_file, stage_dir

WORKER = Path(__file__).resolve().parent / "dp_worker.py"
# gate and generator under data parallelism: gradient sums reassociate. Measured on an AVX2 CPU: 6e-7 on the
# generator's parameters, 6e-8 on its samples, 2e-6 on the gate's; on an AVX-512 CPU the gate's reached 3.1e-5
# (other matmul kernels, hence other rounding), so the gate gets a looser bound
DP_TOLERANCE = 1e-5
GATE_TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def launch_two(folder: Path) -> list[dict]:
    """``accelerate launch`` the worker as 2 CPU processes; each rank's output."""
    # `--cpu --num_processes 2` would start a single process: MULTI_CPU needs --multi_gpu with ACCELERATE_USE_CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(WORKER), str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=cpu_env())
    assert out.returncode == 0, out.stderr[-4000:]
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def max_diff(a, b) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(max_diff(a[k], b[k]) for k in a)
    return (a.float() - b.float()).abs().max().item()


def test_two_processes_equal_one(tmp_path):
    pool_file(tmp_path)
    single = run(tmp_path, dp_hparams(tmp_path))
    assert single["world_size"] == 1 and single["ok"].all()
    ranks = launch_two(tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]

    # every rank holds the same edit, bit for bit (stage 1 broadcast, embeddings and stage 3 gathered, DDP steps)
    for key in ("neurons", "ok", "generator", "samples", "familiarity", "embeddings"):
        assert max_diff(ranks[0][key], ranks[1][key]) == 0, key

    # the work was split: chunks dealt out one per rank per round, each generator batch sliced across ranks
    prompts = [r["prompt"] for r in EDITS]
    assert ranks[0]["fitted_prompts"] == prompts[0::2] and ranks[1]["fitted_prompts"] == prompts[1::2]
    per_step = [a + b for a, b in zip(ranks[0]["gen_rows"], ranks[1]["gen_rows"])]
    assert per_step == single["gen_rows"]  # the same global batches, steps and order as one process
    assert max(ranks[0]["gen_rows"]) < max(single["gen_rows"]) and 0 in ranks[0]["gen_rows"]
    per_step = [a + b for a, b in zip(ranks[0]["gate_rows"], ranks[1]["gate_rows"])]
    assert per_step == single["gate_rows"] and max(ranks[0]["gate_rows"]) < max(single["gate_rows"])
    # each training text embedded once, by one rank (stage 1's own texts aside: the tuned encoder is broadcast)
    assert sorted(ranks[0]["embedded"] + ranks[1]["embedded"]) == sorted(single["embedded"])
    assert not set(ranks[0]["embedded"]) & set(ranks[1]["embedded"])

    # the result of one process: neuron fits do not depend on the rank, the generator up to float rounding
    assert torch.equal(ranks[0]["neurons"], single["neurons"]) and torch.equal(ranks[0]["ok"], single["ok"])
    assert max_diff(ranks[0]["familiarity"], single["familiarity"]) < GATE_TOLERANCE
    assert max_diff(ranks[0]["generator"], single["generator"]) < DP_TOLERANCE
    assert max_diff(ranks[0]["samples"], single["samples"]) < DP_TOLERANCE
    assert abs(ranks[0]["gen_loss"] - single["gen_loss"]) < DP_TOLERANCE

    # rank 0 wrote complete checkpoints: one process resumes from them and trains nothing more
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    assert len(list((stage_dir(run_dir, "stage3_neurons") / "neurons").iterdir())) == len(EDITS) and not list(run_dir.rglob(".*tmp-*"))
    resumed = run(tmp_path, dp_hparams(tmp_path, checkpoint_dir=str(tmp_path / "checkpoints")))
    assert resumed["fitted_prompts"] == [] and resumed["gen_rows"] == []
    assert max_diff(resumed["generator"], ranks[0]["generator"]) == 0
    assert torch.equal(resumed["neurons"], ranks[0]["neurons"])


def test_megedit_edit_under_torchrun_equals_one_process(tmp_path, capsys):
    hp = tiny_yaml(tmp_path, tiny_model_dir(tmp_path), fit_batch_edits=1, gen_batch_size=31)
    args = ["edit", str(hp), "--data", str(edits_file(tmp_path)), "--num-edits", "4"]
    assert megedit_main([*args, "--out", str(tmp_path / "one"), "--save", str(tmp_path / "one-edit")]) == 0
    capsys.readouterr()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megedit.cli", *args, "--out", str(tmp_path / "two"), "--save", str(tmp_path / "two-edit")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=cpu_env())
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("MeG on ") == 1 and out.stdout.count("results: ") == 1  # rank 0 alone reports

    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["report"]["world_size"] == 2 and "world_size" not in one["report"]
    rss = two["peak_memory"]["rss_gb_per_rank"]  # both processes' peaks, summed: they share the machine
    assert len(rss) == 2 and min(rss) > 0 and two["peak_memory"]["peak_gb"] == sum(rss)
    for key in ("pre", "post", "per_request_post"):
        assert one[key] == two[key], key
    assert abs(one["report"]["generator"]["loss"] - two["report"]["generator"]["loss"]) < DP_TOLERANCE
    for part, tolerance in (("generator", DP_TOLERANCE), ("familiarity", GATE_TOLERANCE), ("encoder/model", 0)):
        saved = [load_file(tmp_path / d / f"{part}.safetensors") for d in ("one-edit", "two-edit")]
        assert max_diff(*saved) <= tolerance, part


def test_single_process_helpers_are_identities():
    """Without a launcher nothing is distributed and every collective hands its input back."""
    assert not distributed.launched() or distributed.world_size() == 1
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and distributed.all_gather_objects("x") == ["x"]
    distributed.broadcast_tensors([t])
    assert torch.equal(t, torch.arange(3.0)) and distributed.local_device("cuda") == "cuda"
