"""Run-time ablations on one saved MeG edit: sampling steps, and the familiarity gate on/off.

    megedit edit hparams/MeG/smollm2-135m.yaml --data counterfact/counterfact-edit.json --n 100 --save results/edit100/edit
    python bench/ablate_runtime.py hparams/MeG/smollm2-135m.yaml results/edit100/edit --n 100

The edit is trained once; each variant changes only how it runs (``MeGModel.settings``, a ``QuerySettings``), on the
same requests it was trained for:
the generator sampled with 1 (default), 10 and 50 DDIM steps (the paper used 50), and the gate switched off (every query
gets a generated neuron: what locality would be without it). Each row: Rel/Gen/Loc TF and AG, Score, and the edited
model's forward time on 32 of the edit prompts. Writes ``ablate_runtime.json`` / ``.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit import MeGHyperParams, evaluate_requests, load_model, load_requests, locality_reference  # noqa: E402
from megedit.records import REPORTABLE, environment, write_json  # noqa: E402
from megedit.model import GATE_OFF, MeGModel, QuerySettings  # noqa: E402



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

    variants = [("as trained", QuerySettings()), ("10 sampling steps", QuerySettings(sample_steps=10)),
                ("50 sampling steps", QuerySettings(sample_steps=50)), ("gate off", GATE_OFF)]
    rows = []
    for name, settings in variants:
        edited.settings = settings  # query-time settings: the trained edit itself is never changed
        summary = evaluate_requests(edited, tok, requests, reference, progress=False)["summary"]
        row = {"variant": name, **{m: summary[m] for m in REPORTABLE}, "forward_32_s": forward_seconds(edited, inputs),
               "sample_steps": settings.sample_steps or edited.edit.generator.sample_steps}
        rows.append(row)
        print(row, flush=True)

    out = Path(args.out)
    write_json(out / "ablate_runtime.json", {"rows": rows, "edit": args.edit, "n": args.n, "environment": environment()})
    lines = ["| variant | " + " | ".join(REPORTABLE) + " | forward, 32 edit prompts (s) |",
             "|---" * (len(REPORTABLE) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[m]:.1f}" for m in REPORTABLE) + f" | {r['forward_32_s']:.3f} |")
    (out / "ablate_runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
