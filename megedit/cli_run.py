"""``megedit run <config.yaml>``: every method of the config edits the same requests through EasyEdit's BaseEditor."""
from __future__ import annotations

import time


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="compare editing methods (hparams YAMLs) on the same requests; see examples/")
    p.add_argument("config", help="run config YAML, e.g. examples/quick_compare.yaml")
    p.add_argument("--output", help="overrides the config's output folder")
    p.add_argument("--sizes", type=int, nargs="+", metavar="N",
                   help="numbers of edits to run instead of the config's sizes, e.g. --sizes 100 (the rest later: "
                        "finished sizes and cached z vectors are reused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args) -> int:
    from .report import kind_rows, markdown_table, ordered, result_row
    from .runner import load_config, run

    cfg = load_config(args.config, output=args.output, sizes=args.sizes)
    start = time.time()
    records = ordered([m.name for m in cfg.methods], run(cfg, progress=not args.no_progress))
    print(markdown_table([result_row(r, cfg.metrics) for r in records]))
    per_kind = kind_rows(records)
    if per_kind:  # locality and portability of each kind (KnowEdit's same-subject Relation_Specificity, ...)
        print("\n" + markdown_table(per_kind))
    print(f"results: {cfg.output}/results.md, .csv, .json, .png ({time.time() - start:.0f} s wall)")
    return 0
