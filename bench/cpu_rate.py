"""What this CPU can do against what one generator step needs: how close stage 4 runs to the matmul rate.

    python bench/cpu_rate.py hparams/MeG/smollm2-135m-10k.yaml --out bench/results/cpu_rate_<machine>

Measures a 4096x576 @ 576x1536 matmul (a SmolLM2 MLP's shape) in float32 and, where the CPU has native bfloat16
matmuls, in bfloat16, on 1 thread and on every core; counts the FLOPs of one training step of the hparams' DiT
(forward + backward, ``gen_batch_size`` rows, torch's FlopCounterMode). Divide the count by a measured step time
(the tqdm rate of stage 4) to see how much of the matmul rate the generator gets. Writes ``cpu_rate.json`` and
``cpu_rate.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit import MeGHyperParams  # noqa: E402
from megedit.generator import NeuronGenerator  # noqa: E402
from megedit.keep import machine  # noqa: E402
from megedit.precision import autocast_dtype  # noqa: E402
from megedit.records import environment, write_json  # noqa: E402

SHAPE = (4096, 576, 1536)


def matmul_gflops(dtype: torch.dtype, threads: int, seconds: float = 2.0) -> float:
    torch.set_num_threads(threads)
    m, k, n = SHAPE
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - start) / 1e9


def generator_step_gflop(hp, vector_size: int, cond_dim: int) -> float:
    net = NeuronGenerator(vector_size, cond_dim, hp).net  # the DiT stage 4 trains
    rows = hp.gen_batch_size
    x, cond, t = torch.randn(rows, vector_size), torch.randn(rows, cond_dim), torch.randint(0, 1000, (rows,))
    with FlopCounterMode(display=False) as counter:
        (net(x, t, cond) - x).pow(2).mean().backward()
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hparams", help="a MeG hparams file (its DiT is counted)")
    ap.add_argument("--vector-size", type=int, default=1152, help="neuron weights per edit (SmolLM2-135M: 2 x 576)")
    ap.add_argument("--cond-dim", type=int, default=384, help="query embedding width (all-MiniLM-L6-v2: 384)")
    ap.add_argument("--seconds", type=float, default=2.0, help="how long each matmul rate is measured")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hp = MeGHyperParams.from_hparams(args.hparams)
    if hp.generator != "dit":
        ap.error(f"{args.hparams}: generator is {hp.generator!r}; this counts a DiT's step")
    cores = len(os.sched_getaffinity(0))
    dtypes = [torch.float32] + ([torch.bfloat16] if autocast_dtype("auto", torch.device("cpu")) else [])
    rows = [{"dtype": str(d).removeprefix("torch."), "threads": th,
             "gflops": round(matmul_gflops(d, th, args.seconds), 1)} for d in dtypes for th in sorted({1, cores})]
    step = generator_step_gflop(hp, args.vector_size, args.cond_dim)
    out, cpu = Path(args.out), machine()
    write_json(out / "cpu_rate.json", {"matmul": {"shape": SHAPE, "rows": rows},
                                       "generator_step_gflop": round(step, 2), "gen_batch_size": hp.gen_batch_size,
                                       "hparams": args.hparams, "machine": cpu, "environment": environment()})
    lines = [f"{cpu['cpu']}, {cpu['cpus']} CPUs ({', '.join(cpu['cpu_flags']) or 'no flags known'})", "",
             f"| matmul {'x'.join(map(str, SHAPE))} | threads | GFLOP/s |", "|---|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['threads']} | {r['gflops']:.1f} |" for r in rows]
    lines += ["", f"One generator training step ({hp.gen_batch_size} rows, forward + backward): {step:.2f} GFLOP"]
    (out / "cpu_rate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
