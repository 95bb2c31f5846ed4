"""Cost of applying edits, and how it grows with their number, from finished ``megedit run`` folders.

    python bench/cost.py results/bench/counterfact_meg results/bench/counterfact_baselines --out results/bench/cost

For each method and size: edit wall time (all of MeG's four stages; MEMIT/AlphaEdit's whole batch_edit), seconds per
edit, peak memory, and for MeG the time of each stage. Per method with two sizes or more, the exponent b of
time ≈ a·n^b (least squares on log-log). Writes ``cost.json``, ``cost.md`` and ``cost.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit.records import environment, write_json  # noqa: E402

STAGES = ("stage1_encoder", "embed", "stage2_familiarity", "stage3_neurons", "stage4_generator")


def records(folders: list[str]) -> list[dict]:
    out = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `megedit run <config>` for {folder} first")
        out += json.loads(path.read_text())["records"]
    return out


def growth_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    if len(set(sizes)) < 2:
        return None
    slope, _ = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(slope)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="output folders of `megedit run`")
    ap.add_argument("--out", default="results/bench/cost")
    args = ap.parse_args()

    rows = []
    for r in records(args.folders):
        stages = ((r.get("meg_report") or {}).get("seconds") or {})
        rows.append({"method": r["method"], "n": r["n"], "edit_seconds": r["edit_seconds"],
                     "seconds_per_edit": r["edit_seconds"] / r["n"], "peak_rss_gb": r["peak_rss_gb"],
                     "z_reused": r.get("z_reused", 0), **{s: stages[s] for s in STAGES if s in stages}})
    rows.sort(key=lambda row: (row["method"], row["n"]))
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    exponents = {m: growth_exponent([x["n"] for x in rs], [x["edit_seconds"] for x in rs]) for m, rs in by_method.items()}

    out = Path(args.out)
    write_json(out / "cost.json", {"rows": rows, "exponents": exponents, "folders": args.folders,
                                   "environment": environment()})
    lines = ["| method | edits | edit time (s) | s / edit | peak RSS (GB) | " + " | ".join(STAGES) + " |",
             "|---" * (5 + len(STAGES)) + "|"]
    for row in rows:
        stage_cells = " | ".join(f"{row[s]:.0f}" if s in row else "" for s in STAGES)
        note = f" ({row['z_reused']} z cached)" if row["z_reused"] else ""
        lines.append(f"| {row['method']} | {row['n']} | {row['edit_seconds']:.0f}{note} | {row['seconds_per_edit']:.2f} | "
                     f"{row['peak_rss_gb']:.2f} | {stage_cells} |")
    lines.append("")
    lines += [f"- {m}: time ≈ a·n^{b:.2f}" if b is not None else f"- {m}: one size only, no exponent"
              for m, b in exponents.items()]
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, rs in by_method.items():
        ax.plot([x["n"] for x in rs], [x["edit_seconds"] for x in rs], marker="o", label=m)
    ax.set(xscale="log", yscale="log", xlabel="edits", ylabel="edit wall time (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)


if __name__ == "__main__":
    main()
