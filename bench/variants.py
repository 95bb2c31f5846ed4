"""MeG variants on one edit set, each against the same base: what a setting buys or costs, per stage and per metric.

    python bench/variants.py hparams/MeG/smollm2-135m.yaml --data counterfact/counterfact-val.json --n 500 \
        --out bench/results/<sweep> --checkpoint-dir ~/.cache/megedit/<sweep> \
        base "" gate10 "familiarity_epochs=10" fit_gradient "fit_init=gradient"

Every variant shares ``--checkpoint-dir``, so a stage whose settings a variant leaves alone is read from an earlier
variant's checkpoint, not trained again (its seconds are then those of the run that made it; the table says which
stages a variant trained). The unedited model's locality answers are computed once. Each variant writes
``<out>/<name>/results.json`` (metrics, per-request results, the training report with its curves, seconds per stage,
provenance); ``<out>/variants.md`` is rebuilt from all of them after each variant. A variant already there is skipped.
Choose settings on a validation split (``counterfact-val``, ``zsre-val``): never on the edits you report.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megedit import apply_meg_to_model, evaluate_requests, load_model, load_requests, locality_reference
from megedit.cli_edit import evaluation_sample, parse_overrides
from megedit.data import drop_conflicts, validate_requests
from megedit.hparams import MeGHyperParams
from megedit.keep import provenance
from megedit.meg_main import MEG_NEEDS_SUBJECT
from megedit.records import write_json

METRICS = ("rel_tf", "rel_ag", "gen_tf", "gen_ag", "loc_tf", "loc_ag", "score")
# KnowEdit's same-subject locality and alias portability (nan on data without those kinds, e.g. CounterFact)
KIND_COLUMNS = ("loc_tf.Relation_Specificity", "loc_ag.Relation_Specificity", "port_ag.Subject_Aliasing")
STAGES = ("stage1_encoder", "embed", "stage2_familiarity", "stage3_neurons", "stage4_generator")


def stage_folders(checkpoint_dir: str) -> set[str]:
    """The stage folders under a checkpoint folder (``<run>/<stage>-<key>``): a variant trained those it adds."""
    root = Path(checkpoint_dir).expanduser()
    return {p.name for p in root.glob("*/*") if p.is_dir()} if root.exists() else set()


def trained(before: set[str], after: set[str]) -> list[str]:
    """The stages whose folders a variant added, in stage order."""
    stages = {f.rsplit("-", 1)[0] for f in after - before}
    return sorted(stages, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES))


def table(out: Path) -> str:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"), key=lambda p: p.stat().st_mtime)]
    kinds = [k for k in KIND_COLUMNS if any(k in r.get("post", {}) for r in records)]  # only where the data has them
    lines = ["| variant | settings | " + " | ".join(METRICS + tuple(kinds)) + " | gate: views pass | same subject blocked"
             " | fit steps/edit | gen steps | " + " | ".join(s.removeprefix("stage") for s in STAGES) + " | trained here |",
             "|---|---|" + "---:|" * (len(METRICS) + len(kinds) + 4 + len(STAGES)) + "---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['settings']} | failed: {r['error'][:80]} |")
            continue
        rep, secs = r["report"], r["seconds"]
        cells = [f"{r['post'].get(m, float('nan')):.1f}" for m in METRICS]
        cells += [f"{r['post'].get(k, float('nan')):.1f}" for k in kinds]
        gate = rep.get("gate", {})
        cells += [f"{gate.get('familiar_pass', float('nan')):.3f}",
                  f"{gate.get('near_miss_blocked', {}).get('same_subject', float('nan')):.3f}"]
        cells += [f"{rep['fit']['mean_steps']:.1f}", str(rep["generator"]["steps"])]
        cells += [f"{secs.get(s, 0):.0f}" for s in STAGES]
        lines.append(f"| {r['variant']} | `{r['settings'] or '(base)'}` | " + " | ".join(cells)
                     + f" | {', '.join(r['trained_stages']) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hparams")
    ap.add_argument("--data", required=True, help="edit file, relative to $MEGEDIT_DATA")
    ap.add_argument("--format", default="auto", help="data format (as megedit edit's --format)")
    ap.add_argument("--split", choices=("validation", "reported"), help="KnowEdit only: this part of the file")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint-dir", required=True)
    ap.add_argument("--eval-n", type=int, help="score a uniform sample of this many edits (as megedit edit's --eval-n); "
                    "every variant trains on all of them")
    ap.add_argument("variants", nargs="+", help='NAME "key=value key=value" pairs ("" for the base)')
    args = ap.parse_args(argv)
    if len(args.variants) % 2:
        ap.error("variants come in pairs: NAME \"key=value ...\"")
    variants = list(zip(args.variants[0::2], args.variants[1::2]))
    hp0 = MeGHyperParams.from_hparams(args.hparams)
    for name, sets in variants:  # bad settings fail here, before any model is loaded
        MeGHyperParams.from_dict({**hp0.to_dict(), **parse_overrides(sets.split())}, source=name)
    out = Path(args.out)
    requests, _ = drop_conflicts(load_requests(args.format, args.data, n=args.n, split=args.split))
    requests = validate_requests(requests, need_subject=MEG_NEEDS_SUBJECT)
    scored = evaluation_sample(requests, args.eval_n, hp0.seed)  # bad --eval-n fails here, before the model loads
    model, tok = load_model(hp0)
    edit_set = "_".join(filter(None, (Path(args.data).stem, args.split, f"n{args.n}",
                                      args.eval_n and f"eval{args.eval_n}")))  # the unedited answers' key
    ref_path = Path(args.checkpoint_dir).expanduser() / f"locality_reference_{edit_set}.pt"
    if ref_path.exists():
        reference = torch.load(ref_path)
    else:
        reference = locality_reference(model, tok, scored, hp0.eval_batch_size)
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(reference, ref_path)
    for name, sets in variants:
        path = out / name / "results.json"
        if path.exists():
            print(f"{name}: exists, skipped", flush=True)
            continue
        hp = MeGHyperParams.from_dict({**hp0.to_dict(), **parse_overrides(sets.split()),
                                       "checkpoint_dir": args.checkpoint_dir}, source=name)
        record = {"variant": name, "settings": sets, "data": args.data, "n": len(requests), "n_scored": len(scored),
                  **provenance()}
        before, t0 = stage_folders(args.checkpoint_dir), time.time()
        try:
            edited, _ = apply_meg_to_model(model, tok, requests, hp, progress=False)
        except RuntimeError as e:  # e.g. a diverged generator: recorded, and the next variant runs
            write_json(path, {**record, "error": str(e)})
            continue
        train_s, t0 = time.time() - t0, time.time()
        post = evaluate_requests(edited, tok, scored, reference, hp.eval_batch_size, progress=False)
        report = edited.report
        write_json(path, {**record, "post": post["summary"], "report": report,
                          "trained_stages": trained(before, stage_folders(args.checkpoint_dir)),
                          "seconds": {**report["seconds"], "train_wall": train_s, "post_eval": time.time() - t0},
                          "per_request_post": post["per_request"]})
        (out / "variants.md").write_text(table(out))
        print(f"{name}: " + " ".join(f"{m} {post['summary'][m]:.1f}" for m in METRICS + KIND_COLUMNS
                                     if m in post["summary"]), flush=True)
        model = edited.unload()


if __name__ == "__main__":
    sys.exit(main())
