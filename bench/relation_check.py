"""Ablation of the relation check (megedit/relation.py) on one saved edit, without retraining.

The check is query-time only: it is built from the saved edit's tuned encoder and its edits' training views, which are
rebuilt here exactly as training built them (same pool, hparams and seed). Each variant attaches a check (or none) to
the same edit and measures Rel, locality and portability per kind, and the gate probe's rates per query kind (the
fraction of queries that get the edit: gate and check together).

    megedit edit hparams/MeG/smollm2-135m.yaml --data knowedit/wiki_counterfact_train_cf.json --split validation \
        --n 50 --save runs/ke50-base --out runs/ke50-base-eval
    python bench/relation_check.py --edit runs/ke50-base --data knowedit/wiki_counterfact_train_cf.json \
        --split validation --n 50 --out runs/relation-ke50
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from megedit import relation as relation_module
from megedit.data import load_requests
from megedit.evaluate import evaluate_requests, locality_reference
from megedit.leakage import HeldOutTexts
from megedit.loading import load_model
from megedit.meg_main import build_texts, load_pool
from megedit.model import MeGModel
from megedit.probe import gate_probe
from megedit.relation import fit_relation_check

# name -> changes: relation_* hparams, and "mask" (what stands for the subject)
VARIANTS = {
    "gate only (no check)": None,
    "check, calibration edits": {"relation_calibration": "edits"},
    "check, calibration pool": {"relation_calibration": "pool"},
    "check, calibration both": {"relation_calibration": "both"},
    "check both, top_k 1": {"relation_calibration": "both", "relation_top_k": 1},
    "check both, mask 'someone'": {"relation_calibration": "both", "mask": "someone"},
    "check, threshold 0.6 (fixed)": {"relation_threshold": 0.6},
    "check, threshold 0.8 (fixed)": {"relation_threshold": 0.8},
}
COLUMNS = [("rel_tf", "Rel TF"), ("rel_ag", "Rel AG"), ("gen_tf", "Gen TF"), ("gen_ag", "Gen AG"),
           ("loc_tf", "Loc TF"), ("loc_ag", "Loc AG"),
           ("loc_tf.Relation_Specificity", "RS TF"), ("loc_ag.Relation_Specificity", "RS AG"),
           ("loc_tf.Forgetfulness", "Forg TF"), ("loc_ag.Forgetfulness", "Forg AG"),
           ("port_tf.Subject_Aliasing", "SA TF"), ("port_ag.Subject_Aliasing", "SA AG"), ("score", "Score")]
RATES = [("edit_prompt", "edit"), ("rephrase", "rephr"), ("locality", "loc"),
         ("locality.Relation_Specificity", "RS"), ("locality.Forgetfulness", "Forg"),
         ("portability.Subject_Aliasing", "SA"), ("near_same_relation", "nm rel"),
         ("near_same_subject", "nm subj"), ("near_unrelated", "nm unrel")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edit", required=True, help="a saved edit (megedit edit ... --save DIR)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--split", choices=("validation", "reported"))
    parser.add_argument("--n", type=int, required=True, help="the --n the edit was trained with")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--variants", nargs="*", help="names of VARIANTS to run (default: all)")
    parser.add_argument("--routing-only", action="store_true", help="only the gate probe's rates (no LLM evaluation: "
                        "minutes instead of an hour on a busy CPU)")
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    requests = load_requests(args.format, args.data, n=args.n, offset=args.offset, split=args.split)
    edit_dir = Path(args.edit)
    from megedit.hparams import MeGHyperParams
    import yaml

    hp = MeGHyperParams.from_dict(yaml.safe_load((edit_dir / "hparams.yaml").read_text()))
    model, tok = load_model(hp)
    edited = MeGModel.from_pretrained(model, tok, edit_dir)
    saved = [(e.get("prompt"), e.get("target_new")) for e in edited.edit.edits or []]
    if saved != [(r["prompt"], r["target_new"]) for r in requests]:
        raise SystemExit("these requests are not the ones the saved edit was trained on: check --data/--split/--n")
    pool = load_pool(requests, hp)
    t0 = time.time()
    reference = None if args.routing_only else locality_reference(model, tok, requests, hp.eval_batch_size)
    reference_s = time.time() - t0
    rows = {}
    for name in args.variants or list(VARIANTS):
        changes = VARIANTS[name]
        report, t0 = {}, time.time()
        if changes is None:
            edited.edit.relation = None
        else:
            changes = dict(changes)
            relation_module.MASK = changes.pop("mask", "X")
            hp_v = hp.replace(relation_check=True, **changes)
            held_out = HeldOutTexts(requests)
            views = build_texts(requests, pool, hp_v, held_out).views
            edited.edit.relation, report = fit_relation_check(edited.edit.encoder, requests, views, pool, hp_v,
                                                              held_out)
            report["left_out_leaking"] = held_out.report()["left_out_total"]
        report["build_s"] = time.time() - t0
        t0 = time.time()
        post = {} if args.routing_only else \
            evaluate_requests(edited, tok, requests, reference, hp.eval_batch_size, progress=False)["summary"]
        report["eval_s"] = time.time() - t0
        probe = gate_probe(edited.edit, requests, pool, trained_on=requests)
        rows[name] = {"metrics": post, "probe": probe, "relation": report, "mask": relation_module.MASK}
        partial = Path(args.out) / "partial.json"  # a long run stopped midway keeps its finished rows
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(rows, indent=2, default=str))
        print(f"{name}: " + "  ".join(f"{label} {post.get(k, float('nan')):.1f}" for k, label in COLUMNS) + " | " +
              "  ".join(f"{label} {probe['familiar_rate'].get(k, float('nan')):.3f}" for k, label in RATES),
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": vars(args), "edit": str(edit_dir),
                                                  "reference_s": reference_s, "rows": rows}, indent=2, default=str))
    head = "| variant | " + " | ".join(label for _, label in COLUMNS) + " | threshold |"
    if args.routing_only:
        COLUMNS.clear()
    lines = [f"Relation check ablation: {args.n} edits of {args.data}" + (f" ({args.split} part)" if args.split else "")
             + f", saved edit {edit_dir}", "", "Metrics (%, after the edit):", "", head,
             "|" + "---|" * (len(COLUMNS) + 2)]
    for name, row in rows.items():
        thr = row["relation"].get("threshold")
        lines.append(f"| {name} | " + " | ".join(f"{row['metrics'].get(k, float('nan')):.1f}" for k, _ in COLUMNS)
                     + f" | {'-' if thr is None else f'{thr:.3f}'} |")
    lines += ["", "Fraction of queries that get the edit (gate, and the check where there is one; n in brackets):", "",
              "| variant | " + " | ".join(label for _, label in RATES) + " |", "|" + "---|" * (len(RATES) + 1)]
    for name, row in rows.items():
        rate, n = row["probe"]["familiar_rate"], row["probe"]["n"]
        lines.append(f"| {name} | " + " | ".join(f"{rate[k]:.3f} ({n[k]})" if k in rate else "-" for k, _ in RATES)
                     + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
