"""Query cost: the edited model against the unedited one on the same batch of 32 prompts, in one process.

    python bench/query_cost.py hparams/MeG/smollm2-135m.yaml --edit results/edit100/edit   # a saved edit
    python bench/query_cost.py hparams/MeG/smollm2-135m.yaml --train 100                   # or train one first

Three batches: all edit prompts (every row gets a generated neuron), all unrelated prompts (the gate blocks every row),
and half of each. For each: forward (one pass over the prompts) and generate (greedy, 8 new tokens), median of
``--repeats`` runs after a warm-up, unedited and edited interleaved so drift in machine load hits both alike.
Writes ``query_cost.json`` and ``query_cost.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit import MeGHyperParams, apply_meg_to_model, load_model, load_requests  # noqa: E402
from megedit.records import environment, write_json  # noqa: E402
from megedit.model import MeGModel  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, tokenizer caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batches(requests: list[dict], size: int) -> dict[str, list[str]]:
    edits = [r["prompt"] for r in requests][:size]
    unrelated = [loc["prompt"] for r in requests for loc in r["locality"].values()][:size]
    return {"edit prompts": edits, "unrelated": unrelated,
            "half and half": edits[: size // 2] + unrelated[: size - size // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hparams")
    ap.add_argument("--edit", help="a saved MeG edit (megedit edit --save DIR)")
    ap.add_argument("--train", type=int, default=0, help="train an edit on this many requests instead")
    ap.add_argument("--data", default="counterfact/counterfact-edit.json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="results/bench")
    args = ap.parse_args()
    if bool(args.edit) == bool(args.train):
        ap.error("give exactly one of --edit DIR or --train N")

    hp = MeGHyperParams.from_hparams(args.hparams)
    requests = load_requests("auto", args.data, n=max(args.train, args.batch))
    model, tok = load_model(hp)
    tok.padding_side = "left"  # batched generation
    base = copy.deepcopy(model)  # the unedited model, without even the (idle) neuron hook
    if args.edit:
        edited = MeGModel.from_pretrained(model, tok, args.edit)
    else:
        edited, _ = apply_meg_to_model(model, tok, requests[: args.train], hp)

    rows = []
    with torch.no_grad():
        for name, prompts in batches(requests, args.batch).items():
            inputs = tok(prompts, return_tensors="pt", padding=True)
            gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            row = {"batch": name, "n": len(prompts)}
            for what, call in (("forward", lambda m: m(**inputs)), ("generate", lambda m: m.generate(**inputs, **gen))):
                row[f"{what}_unedited_s"] = timed(lambda: call(base), args.repeats)
                row[f"{what}_edited_s"] = timed(lambda: call(edited), args.repeats)
                row[f"{what}_ratio"] = row[f"{what}_edited_s"] / row[f"{what}_unedited_s"]
            row["familiar_rows"] = int(len(edited.route(inputs.input_ids, inputs.attention_mask).rows))
            rows.append(row)
            print(row, flush=True)

    out = Path(args.out)
    write_json(out / "query_cost.json", {"rows": rows, "hparams": args.hparams, "edit": args.edit,
                                         "trained_on": args.train, "environment": environment()})
    lines = ["| batch | familiar rows | forward unedited (s) | forward edited (s) | ratio | generate unedited (s) | "
             "generate edited (s) | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['familiar_rows']}/{r['n']} | {r['forward_unedited_s']:.3f} | "
                     f"{r['forward_edited_s']:.3f} | {r['forward_ratio']:.2f} | {r['generate_unedited_s']:.3f} | "
                     f"{r['generate_edited_s']:.3f} | {r['generate_ratio']:.2f} |")
    (out / "query_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
