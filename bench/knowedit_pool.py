"""A pseudo-edit pool for KnowEdit edits: CounterFact's train split plus one part of a KnowEdit file.

KnowEdit asks about its subjects with WikiData relation templates ("The gender of {} is", "The occupation of {} is")
that CounterFact's pool never uses, so the near misses MeG trains its encoder, gate and thresholds on (same subject /
other relation, same relation / other subject) never look like KnowEdit's Relation_Specificity prompts. This adds, as
pseudo-edits in EasyEdit's CounterFact format, the records of the *other* part of the KnowEdit file (edit on the
validation part: pool from the reported part, and the other way round), each record's prompt and each of its
Relation_Specificity prompts (answer: its ground truth). Nothing of the edited part enters the pool.

    python bench/knowedit_pool.py --counterfact counterfact/counterfact-train.json \
        --knowedit knowedit/wiki_counterfact_train_cf.json --part reported --out runs/pool-knowedit-reported.json
    megedit edit hparams/MeG/smollm2-135m.yaml --data knowedit/wiki_counterfact_train_cf.json --split validation \
        --n 50 --pseudo-data runs/pool-knowedit-reported.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megedit.data import load_requests, resolve_data_path
from megedit.knowedit import SPLITS


def pseudo_edits(knowedit_requests: list[dict]) -> list[dict]:
    """Each KnowEdit request's prompt and its same-subject locality prompts as CounterFact-format pseudo-edits."""
    out = []
    for r in knowedit_requests:
        facts = [(r["prompt"], r["ground_truth"])]
        same = r["locality"].get("Relation_Specificity", {"prompt": [], "ground_truth": []})
        facts += [(p, a[0]) for p, a in zip(same["prompt"], same["ground_truth"])]
        out += [{"case_id": f"knowedit-{r['case_id']}-{j}", "prompt": p, "subject": r["subject"], "target_new": a,
                 "ground_truth": a, "rephrase_prompt": None} for j, (p, a) in enumerate(facts)
                if r["subject"] in p and a]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counterfact", required=True, help="CounterFact train split (EasyEdit format)")
    parser.add_argument("--knowedit", required=True, help="KnowEdit file")
    parser.add_argument("--part", required=True, choices=SPLITS, help="the KnowEdit part that goes into the pool "
                        "(the other part is the one edited)")
    parser.add_argument("--out", required=True, help="pool file to write (JSON)")
    args = parser.parse_args(argv)
    counterfact = json.loads(resolve_data_path(args.counterfact).read_text())
    added = pseudo_edits(load_requests("knowedit", args.knowedit, split=args.part))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(counterfact + added))
    print(f"{out}: {len(counterfact)} CounterFact records + {len(added)} from KnowEdit's {args.part} part")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
