"""bench/cpu_rate.py: the matmul rate and a generator step's FLOP count that bench/README sets against stage 4's time."""
import dataclasses
import json
import sys
from pathlib import Path

from conftest import bench_script
from megedit import MeGHyperParams

ROOT = Path(__file__).resolve().parents[1]


def test_generator_step_flops_grow_with_rows_and_width():
    bench = bench_script("cpu_rate")
    hp = dataclasses.replace(MeGHyperParams.from_hparams(ROOT / "hparams" / "MeG" / "smollm2-135m-10k.yaml"),
                             gen_batch_size=16)  # small: the count runs the step
    full = bench.generator_step_gflop(hp, 1152, 384)
    assert full == 2 * bench.generator_step_gflop(dataclasses.replace(hp, gen_batch_size=8), 1152, 384)
    # the blocks' matmuls dominate: 4x the width is about 16x the count (not 4x, as the other layers would give)
    wide = bench.generator_step_gflop(dataclasses.replace(hp, gen_hidden=4 * hp.gen_hidden), 1152, 384)
    assert 10 * full < wide < 16 * full


def test_main_writes_json_and_markdown(tmp_path, monkeypatch):
    bench = bench_script("cpu_rate")
    out = tmp_path / "rate"
    monkeypatch.setattr(sys, "argv", ["cpu_rate.py", str(ROOT / "hparams" / "MeG" / "smollm2-135m-10k.yaml"),
                                      "--seconds", "0.05", "--out", str(out)])
    bench.main()
    record = json.loads((out / "cpu_rate.json").read_text())
    assert record["generator_step_gflop"] > 0 and record["gen_batch_size"] == 256
    assert {r["dtype"] for r in record["matmul"]["rows"]} >= {"float32"}
    assert all(r["gflops"] > 0 for r in record["matmul"]["rows"])
    assert "GFLOP" in (out / "cpu_rate.md").read_text()
