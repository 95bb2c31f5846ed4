"""``megedit ask <saved edit> "question" ...``: for each question, why the edited model answers as it does (the gate's
entropy and similarity against its thresholds, the nearest edits, the answer with and without the edit)."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("ask", help="trace one query through a saved edit: gate decision, nearest edits, answers")
    p.add_argument("edit", help="a folder written by `megedit edit --save` or save_pretrained")
    p.add_argument("questions", nargs="+", metavar="question", help="one or more queries, each traced on its own")
    p.add_argument("--model", help="the base model (builtin name, folder or hub id); default: the edit's model_name")
    p.add_argument("--device", help="default: the edit's hparams device")
    p.add_argument("--k", type=int, default=3, help="how many nearest edits to list (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=10, help="length of each greedy answer (default 10)")
    p.add_argument("--json", action="store_true", help="print the traces as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    import yaml

    from .artifact import read_manifest
    from .hparams import MeGHyperParams
    from .loading import load_model
    from .model import MeGModel
    from .trace import format_trace, trace_query

    # bad input fails here, before a model is loaded
    blank = [q for q in args.questions if not q.strip()]
    if blank:
        raise ValueError("every question must be non-empty text")
    if args.k < 0 or args.max_new_tokens < 1:
        raise ValueError(f"--k must be >= 0 and --max-new-tokens >= 1, got {args.k} and {args.max_new_tokens}")
    read_manifest(args.edit)  # a complete, undamaged saved edit
    hp = MeGHyperParams.from_dict(yaml.safe_load(open(f"{args.edit}/hparams.yaml").read()),
                                  source=f"{args.edit}/hparams.yaml")
    model, tok = load_model(args.model or hp.model_name, device=args.device or hp.device)
    edited = MeGModel.from_pretrained(model, tok, args.edit)  # refused on any other base model
    traces = [trace_query(edited, q, k=args.k, max_new_tokens=args.max_new_tokens) for q in args.questions]
    print(json.dumps(traces, indent=2) if args.json else "\n\n".join(format_trace(t) for t in traces))
    return 0
