"""The outputs of ``megedit run``: results JSON/CSV, a markdown table (methods × sizes) and a plot."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .evaluate import kind_metrics
from .peak_memory import reported_gb

TITLES = {"rel_tf": "Rel TF", "rel_ag": "Rel AG", "gen_tf": "Gen TF", "gen_ag": "Gen AG", "loc_tf": "Loc TF",
          "loc_ag": "Loc AG", "score": "Score", "ee_rewrite": "EE rewrite", "ee_rephrase": "EE rephrase",
          "ee_locality": "EE locality", "edit_s": "edit time (s)", "peak_gb": "peak mem (GB)"}
NOTE = ("Rel/Gen/Loc in %: TF = teacher-forced token accuracy (EasyEdit's definition; MeG routed on the prompt alone, "
        "as in generation), AG = exact greedy generation; "
        "Loc compares with the unedited model. Score = harmonic mean of the six. EE = EasyEdit's own "
        "compute_edit_quality on the same edited model (its batch_edit output; MeG routed on prompt + answer there). "
        "Edit time = EasyEdit's execution "
        "time of the edit call(s). Peak mem = peak resident memory of the process that ran the method (peak CUDA "
        "memory on a GPU).")
KIND_NOTE = ("Per kind, in %: locality of each kind of locality prompt against the unedited model (CounterFact's "
             "neighborhood; KnowEdit's Relation_Specificity = same subject, another relation, and Forgetfulness) and "
             "portability of each kind (KnowEdit's Subject_Aliasing, Reasoning, Logical_Generalization: TF on the "
             "first alias, AG = greedy generation of any alias). They do not enter the Score.")


def ordered(method_names: list[str], records: list[dict]) -> list[dict]:
    """By size, then in the config's method order."""
    position = {name: i for i, name in enumerate(method_names)}
    return sorted(records, key=lambda r: (r["n"], position.get(r["method"], len(position))))


def result_row(record: dict, metrics: list[str]) -> dict:
    row = {"method": record["method"], "n": record["n"]}
    row.update({m: record["summary"].get(m, math.nan) for m in metrics})
    ee = record["easyedit"]
    row.update({"ee_rewrite": ee["post_rewrite_acc"], "ee_rephrase": ee["post_rephrase_acc"],
                "ee_locality": ee["post_locality_acc"], "edit_s": record["edit_seconds"],
                "peak_gb": reported_gb(record["peak_rss_gb"], record.get("peak_cuda_gb"))})
    return row


def title(column: str) -> str:
    """``loc_tf.Relation_Specificity`` -> "Loc Relation_Specificity TF"; fixed columns from TITLES."""
    if column in TITLES or "." not in column:
        return TITLES.get(column, column)
    prefix, kind = column.split(".", 1)
    group, mode = prefix.split("_")
    return f"{'Loc' if group == 'loc' else 'Port'} {kind} {mode.upper()}"


def kind_rows(records: list[dict]) -> list[dict]:
    """Per record: method, n and every locality/portability kind's TF and AG (NaN where a record lacks a kind)."""
    kinds = kind_metrics({k for r in records for k in r["summary"]})
    if not kinds:
        return []
    return [{"method": r["method"], "n": r["n"], **{k: r["summary"].get(k, math.nan) for k in kinds}} for r in records]


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c not in ("method", "n")]
    lines = ["| method | n | " + " | ".join(title(c) for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if c != "peak_gb" else f"{r[c]:.2f}" for c in cols]
        lines.append(f"| {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_notes(records: list[dict]) -> list[str]:
    """Edit times that exclude cached z vectors, or add up sessions of a resumed run, must say so."""
    return [f"- {r['method']}, n={r['n']}: {r['z_reused']} of {r['n']} target vectors z were read from the z cache; "
            "its edit time excludes computing them." for r in records if r.get("z_reused")] + [
        f"- {r['method']}, n={r['n']}: resumed from its checkpoints; its edit time is the sum of every session's "
        "stage times (work lost to an interrupt after the last save is not counted)."
        for r in records if (r.get("meg_report") or {}).get("resumed")]


def write_tables(output: Path, name: str, rows: list[dict], records: list[dict]) -> None:
    """results.csv (every column, per-kind ones last) and results.md (the main table, then the per-kind one)."""
    per_kind = kind_rows(records)  # records and rows are in the same order
    merged = [{**row, **kinds} for row, kinds in zip(rows, per_kind)] if per_kind else rows
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(merged[0]))
        writer.writeheader()
        writer.writerows(merged)
    notes = "\n".join(time_notes(records))
    kinds = f"\n## Locality and portability per kind\n\n{markdown_table(per_kind)}\n\n{KIND_NOTE}\n" if per_kind else ""
    (output / "results.md").write_text(f"# {name}\n\n{markdown_table(rows)}\n\n{NOTE}\n" + kinds +
                                       (f"\n{notes}\n" if notes else ""))


def plot(rows: list[dict], metrics: list[str], path: Path) -> None:
    """Bars of every metric at the largest size; beside them, Score against the number of edits (several sizes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2 if len(sizes) > 1 else 1, figsize=(14 if len(sizes) > 1 else 10, 4), squeeze=False)
    largest = [r for r in rows if r["n"] == sizes[-1]]
    width = 0.8 / max(1, len(largest))
    ax = axes[0][0]
    for i, r in enumerate(largest):
        ax.bar(np.arange(len(metrics)) + i * width, [r[m] for m in metrics], width, label=r["method"])
    ax.set_xticks(np.arange(len(metrics)) + width * (len(largest) - 1) / 2, [TITLES[m] for m in metrics])
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(f"{sizes[-1]} edits")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    if len(sizes) > 1:
        ax = axes[0][1]
        for name in methods:
            points = sorted((r["n"], r["score"]) for r in rows if r["method"] == name and "score" in r)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("edits")
        ax.set_ylabel("Score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
