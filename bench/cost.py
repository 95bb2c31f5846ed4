"""Cost of applying edits, and how it grows with their number, from finished ``megedit run`` folders or kept results.

    python bench/cost.py results/bench/counterfact_meg results/bench/counterfact_baselines --out results/bench/cost
    python bench/cost.py bench/results/counterfact_meg_5k bench/results/counterfact_meg_10k_v2 --out bench/results/cost_10k

For each method and size: edit wall time (all of MeG's four stages; MEMIT/AlphaEdit's whole batch_edit), seconds per
edit, peak memory, and for MeG the time of each stage. Rows are grouped by method, settings and CPU (a kept result
names its hparams and the CPU's flags; two runs of one file with other values, or on another kind of CPU, are not
one curve), and per group with two sizes or more the exponent b of time ≈ a·n^b (least squares on log-log) is fitted
for the total and for each stage. Writes ``cost.json``, ``cost.md`` and ``cost.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit.checkpoint import NOT_IN_KEY, key_hash  # noqa: E402
from megedit.records import environment, write_json  # noqa: E402

STAGES = ("stage1_encoder", "embed", "stage2_familiarity", "stage3_neurons", "stage4_generator")


def stage_seconds(seconds: dict) -> dict:
    return {s: seconds[s] for s in STAGES if s in seconds}


def records(folders: list[str]) -> list[dict]:
    """One row per method and size: from a ``megedit run`` folder's records or a kept result's rows."""
    out = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `megedit run <config>` for {folder} first")
        data = json.loads(path.read_text())
        if "records" in data:  # megedit run
            for r in data["records"]:
                out.append({"method": r["method"], "n": r["n"], "edit_seconds": r["edit_seconds"],
                            "peak_rss_gb": r["peak_rss_gb"], "z_reused": r.get("z_reused", 0), "group": r["method"],
                            "source": folder, **stage_seconds((r.get("meg_report") or {}).get("seconds") or {})})
        else:  # a kept result (megedit edit --keep)
            out += [kept_row(data, row, folder) for row in data["rows"]]
    return out


def kept_row(data: dict, row: dict, folder: str) -> dict:
    method = row["method"]
    config = data["config"][method]
    # what trains: the hparams without the fields that change nothing trained (checkpoint folder, sampling, ...)
    trained = {k: v for k, v in config["hparams"].items() if k not in NOT_IN_KEY}
    digest = key_hash(trained)[:6]  # the checkpoint keys' hash
    flags = data["machine"]["cpu_flags"]
    cpu = f"{data['machine']['cpu']} ({'AVX512-BF16' if 'avx512_bf16' in flags else 'no AVX512-BF16'})"
    return {"method": method, "n": row["n"], "edit_seconds": row["edit_s"],
            "peak_rss_gb": ((data.get("peak_memory") or {}).get(method) or {}).get("peak_gb"), "z_reused": 0,
            "group": f"{method} {Path(config['hparams_file']).name}#{digest}, {cpu}", "source": folder,
            **stage_seconds(data["seconds"][method])}


def growth_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    if len(set(sizes)) < 2:
        return None
    slope, _ = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(slope)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="output folders of `megedit run` or kept results (bench/results/<run>)")
    ap.add_argument("--out", default="results/bench/cost")
    args = ap.parse_args()

    rows = records(args.folders)
    for row in rows:
        row["seconds_per_edit"] = row["edit_seconds"] / row["n"]
    rows.sort(key=lambda row: (row["group"], row["n"]))
    by_group = defaultdict(list)
    for row in rows:
        by_group[row["group"]].append(row)
    exponents = {g: {part: growth_exponent([x["n"] for x in rs if part in x], [x[part] for x in rs if part in x])
                     for part in ("edit_seconds", *STAGES)} for g, rs in by_group.items()}

    out = Path(args.out)
    write_json(out / "cost.json", {"rows": rows, "exponents": exponents, "folders": args.folders,
                                   "environment": environment()})
    lines = ["| method, settings, CPU | edits | edit time (s) | s / edit | peak RSS (GB) | " + " | ".join(STAGES) + " |",
             "|---" * (5 + len(STAGES)) + "|"]
    for row in rows:
        stage_cells = " | ".join(f"{row[s]:.0f}" if s in row else "" for s in STAGES)
        note = f" ({row['z_reused']} z cached)" if row["z_reused"] else ""
        peak = f"{row['peak_rss_gb']:.2f}" if row["peak_rss_gb"] is not None else ""
        lines.append(f"| {row['group']} | {row['n']} | {row['edit_seconds']:.0f}{note} | {row['seconds_per_edit']:.2f} | "
                     f"{peak} | {stage_cells} |")
    lines.append("")
    for g, parts in exponents.items():
        if parts["edit_seconds"] is None:
            lines.append(f"- {g}: one size only, no exponent")
            continue
        stage_parts = ", ".join(f"{s} {b:.2f}" for s, b in parts.items() if s != "edit_seconds" and b is not None)
        lines.append(f"- {g}: time ≈ a·n^{parts['edit_seconds']:.2f}" + (f" (stages: {stage_parts})" if stage_parts else ""))
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for g, rs in by_group.items():
        ax.plot([x["n"] for x in rs], [x["edit_seconds"] for x in rs], marker="o", label=g)
    ax.set(xscale="log", yscale="log", xlabel="edits", ylabel="edit wall time (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)


if __name__ == "__main__":
    main()
