"""How many views stage 3 must fit each neuron on (a screening for the 10,000-edit budget, #21).

    python bench/fit_views.py hparams/MeG/smollm2-135m.yaml --data counterfact/counterfact-val.json --n 128 \
        --views 0 4 3 2 --out bench/results/fit_views_cf_val_128

For each k, the first n edits' neurons are fitted on the prompt and its first k - 1 views (k = 0: every view, the
default), then each neuron is scored as a perfect generator would deliver it: active at every position of the full
model, teacher-forced token accuracy of ``target_new`` on the edit's own prompt and on its held-out rephrase prompt
(an evaluation text, never a view). The gate and the generator are left out, so this bounds what the fits allow; it is
not the end-to-end Generality. Stage 3's seconds per edit come with it. Choose on a validation split.
Writes ``<out>/results.json`` and ``<out>/results.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit import load_model, load_requests  # noqa: E402
from megedit.data import drop_conflicts, validate_requests  # noqa: E402
from megedit.fitting import fit_neurons  # noqa: E402
from megedit.hparams import MeGHyperParams  # noqa: E402
from megedit.keep import provenance  # noqa: E402
from megedit.meg_main import MEG_NEEDS_SUBJECT, build_texts, load_pool  # noqa: E402
from megedit.neuron import NeuronBatch, active_neurons  # noqa: E402
from megedit.records import write_json  # noqa: E402


@torch.no_grad()
def answer_accuracy(model, tok, prompt: str, answer: str, weights: torch.Tensor) -> float:
    """Teacher-forced token accuracy of ``answer`` after ``prompt``, the neuron active at every position."""
    ids = tok(prompt + " " + answer, return_tensors="pt")["input_ids"]
    n = len(tok(prompt)["input_ids"])
    with active_neurons(NeuronBatch(torch.tensor([0]), weights[None], 1)):
        logits = model(input_ids=ids).logits[0]
    return float((logits[n - 1:-1].argmax(-1) == ids[0, n:]).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hparams")
    parser.add_argument("--data", required=True, help="CounterFact-style records with rephrase prompts")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--views", type=int, nargs="+", default=[0, 4, 3, 2], help="k values (0: every view)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if any(k < 0 for k in args.views):
        parser.error("--views: each k must be 0 (every view) or positive")
    hp = MeGHyperParams.from_hparams(args.hparams)
    requests, _ = drop_conflicts(load_requests("auto", args.data, n=args.n))
    requests = validate_requests(requests, need_subject=MEG_NEEDS_SUBJECT)
    if not all(r.get("rephrase_prompt") for r in requests):
        parser.error(f"{args.data}: every record needs a rephrase prompt to score")
    model, tok = load_model(hp)
    texts = build_texts(requests, load_pool(requests, hp), hp)
    targets = [r["target_new"] for r in requests]
    rephrase = [r["rephrase_prompt"] if isinstance(r["rephrase_prompt"], str) else r["rephrase_prompt"][0]
                for r in requests]
    rows = []
    for k in args.views:
        views = [v[:k] for v in texts.views] if k else texts.views
        start = time.perf_counter()
        fit = fit_neurons(model, tok, views, targets, hp.replace(fit_views=k), progress=False)
        seconds = time.perf_counter() - start
        rel = [answer_accuracy(model, tok, r["prompt"], targets[e], fit.weights[e]) for e, r in enumerate(requests)]
        gen = [answer_accuracy(model, tok, p, targets[e], fit.weights[e]) for e, p in enumerate(rephrase)]
        rows.append({"fit_views": k, "views_per_edit": sum(map(len, views)) / len(views),
                     "stage3_seconds_per_edit": seconds / len(views), "oracle_rel_tf": 100 * sum(rel) / len(rel),
                     "oracle_gen_tf": 100 * sum(gen) / len(gen), "adam_steps_per_edit": float(fit.steps.float().mean()),
                     "ok": float(fit.ok.float().mean())})
        print(rows[-1], flush=True)
    header = "| fit_views | views/edit | stage 3 s/edit | oracle Rel TF | oracle Gen TF | Adam steps/edit | ok |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|"] + [
        f"| {r['fit_views'] or 'all'} | {r['views_per_edit']:.2f} | {r['stage3_seconds_per_edit']:.2f} | "
        f"{r['oracle_rel_tf']:.1f} | {r['oracle_gen_tf']:.1f} | {r['adam_steps_per_edit']:.2f} | {r['ok']:.3f} |"
        for r in rows]
    print("\n".join(lines))
    out = Path(args.out)
    record = {"data": args.data, "n": len(requests), "rows": rows, **provenance()}
    write_json(out / "results.json", record)
    (out / "results.md").write_text(
        f"# fit_views screening, {len(requests)} edits of {args.data}\n\n" + "\n".join(lines) + "\n\n"
        f"Oracle: each fitted neuron active at every position (no gate, no generator); torch threads "
        f"{torch.get_num_threads()}. Command: `{record['command']}`, commit `{record['git'].get('commit')}`.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
