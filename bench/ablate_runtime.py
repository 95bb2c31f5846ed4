"""Run-time ablations on one saved MeG edit: sampling steps, and the familiarity gate on/off.

    megedit edit hparams/MeG/smollm2-135m.yaml --data counterfact/counterfact-edit.json --n 100 --save results/edit100/edit
    python bench/ablate_runtime.py hparams/MeG/smollm2-135m.yaml results/edit100/edit --n 100

The edit is trained once; each variant changes only how it runs, on the same requests it was trained for:
the generator sampled with 1 (default), 10 and 50 DDIM steps (the paper used 50), and the gate switched off (every query
gets a generated neuron: what locality would be without it). Each row: Rel/Gen/Loc TF and AG, Score, and the edited
model's forward time on 32 of the edit prompts. Writes ``ablate_runtime.json`` / ``.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit import MeGHyperParams, evaluate_requests, load_model, load_requests, locality_reference  # noqa: E402
from megedit.cli import environment, write_json  # noqa: E402
from megedit.model import MeGModel  # noqa: E402

METRICS = ("rel_tf", "rel_ag", "gen_tf", "gen_ag", "loc_tf", "loc_ag", "score")


@contextlib.contextmanager
def variant(edited: MeGModel, steps: int | None = None, gate_off: bool = False):
    """Temporarily sample with ``steps`` and/or let every query through the gate."""
    gen, fam = edited.edit.generator, edited.edit.familiarity
    saved = gen.sample_steps, fam.epsilon.clone(), fam.tau.clone()
    try:
        if steps is not None:
            gen.sample_steps = steps
        if gate_off:
            fam.epsilon.fill_(float("inf"))
            fam.tau.fill_(-float("inf"))
        yield
    finally:
        gen.sample_steps = saved[0]
        fam.epsilon.copy_(saved[1])
        fam.tau.copy_(saved[2])


def forward_seconds(model, inputs, repeats: int = 5) -> float:
    with torch.no_grad():
        model(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hparams")
    ap.add_argument("edit", help="the saved edit (megedit edit --save DIR)")
    ap.add_argument("--data", default="counterfact/counterfact-edit.json")
    ap.add_argument("--n", type=int, default=100, help="the requests the edit was trained on (first n)")
    ap.add_argument("--out", default="results/bench/ablate_runtime")
    args = ap.parse_args()

    hp = MeGHyperParams.from_hparams(args.hparams)
    requests = load_requests("auto", args.data, n=args.n)
    model, tok = load_model(hp)
    reference = locality_reference(model, tok, requests)
    edited = MeGModel.from_pretrained(model, tok, args.edit)
    inputs = tok([r["prompt"] for r in requests[:32]], return_tensors="pt", padding=True)

    variants = [("as trained", dict()), ("10 sampling steps", dict(steps=10)), ("50 sampling steps", dict(steps=50)),
                ("gate off", dict(gate_off=True))]
    rows = []
    for name, kw in variants:
        with variant(edited, **kw):
            summary = evaluate_requests(edited, tok, requests, reference, progress=False)["summary"]
            row = {"variant": name, **{m: summary[m] for m in METRICS},
                   "forward_32_s": forward_seconds(edited, inputs), "sample_steps": edited.edit.generator.sample_steps}
        rows.append(row)
        print(row, flush=True)

    out = Path(args.out)
    write_json(out / "ablate_runtime.json", {"rows": rows, "edit": args.edit, "n": args.n, "environment": environment()})
    lines = ["| variant | " + " | ".join(METRICS) + " | forward, 32 edit prompts (s) |",
             "|---" * (len(METRICS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[m]:.1f}" for m in METRICS) + f" | {r['forward_32_s']:.3f} |")
    (out / "ablate_runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
