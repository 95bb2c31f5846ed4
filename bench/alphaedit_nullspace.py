"""How much room AlphaEdit's null space leaves for n edits: its dimension per layer, and the share of the edit keys in it.

AlphaEdit projects every update onto the eigen-directions of the preserved keys' covariance C0 with eigenvalue below
``nullspace_threshold``, so n edits must be written through a subspace of that dimension: when n edits' keys need more
independent directions than it has, they compete and reliability falls. This prints, for each edited layer and
several thresholds, the null-space dimension and the median share of an edit key's energy inside it (keys: the
rewritten module's input at the subject's last token of each edit prompt, as MEMIT's ``subject_last``, without
MEMIT's context-template averaging), and the share of the preserved keys' energy the projection lets through,
trace(P·C0)/trace(C0): what an update inside the "null" space can still change on preserved knowledge.

    megedit stats hparams/MEMIT/smollm2-135m.yaml        # the covariance files, once
    python bench/alphaedit_nullspace.py hparams/AlphaEdit/smollm2-135m.yaml --n 1000

Writes results/bench/alphaedit_nullspace/{results.json,results.md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megedit import load_requests  # noqa: E402
from megedit.records import environment, write_json  # noqa: E402
from megedit.easyedit.loader import load_model_named  # noqa: E402
from megedit.stats import is_valid, read_covariance, stats_paths  # noqa: E402
from megedit.yaml_file import read_yaml_mapping  # noqa: E402


@torch.no_grad()
def subject_last_keys(model, tok, requests: list[dict], module_names: list[str], batch_size: int = 32):
    """Input of each named module at the last token of each request's subject: {name: (n, d_k)}."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in module_names}
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        positions = []
        for r in batch:
            head = r["prompt"][: r["prompt"].index(r["subject"]) + len(r["subject"])]
            positions.append(len(tok(head)["input_ids"]) - 1)
        enc = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True)  # right padding
        captured = {}
        hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: captured.__setitem__(n, a[0]))
                 for n in module_names]
        try:
            model(**enc)
        finally:
            for h in hooks:
                h.remove()
        rows = torch.arange(len(batch))
        for n in module_names:
            seen[n].append(captured[n][rows, torch.tensor(positions)].double())
    return {n: torch.cat(v) for n, v in seen.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hparams", help="AlphaEdit hparams YAML (its layers, module and statistics settings)")
    p.add_argument("--data", default="counterfact/counterfact-edit.json")
    p.add_argument("--n", type=int, default=1000, help="edit requests whose keys are measured")
    p.add_argument("--thresholds", type=float, nargs="+", default=[1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1])
    p.add_argument("--out", default="results/bench/alphaedit_nullspace")
    args = p.parse_args()
    hp = read_yaml_mapping(Path(args.hparams), "hparams file")
    model, tok = load_model_named(hp["model_name"])  # as EasyEdit sees it: the statistics files are named after it
    tok.padding_side = "right"
    requests = load_requests("auto", args.data, n=args.n)
    names = [hp["rewrite_module_tmp"].format(layer) for layer in hp["layers"]]
    keys = subject_last_keys(model, tok, requests, names)
    rows = []
    for layer, name in zip(hp["layers"], names):
        paths = stats_paths(model, hp, layer)
        found = [q for q in paths if is_valid(q, hp["mom2_n_samples"])]
        if not found:
            raise SystemExit(f"no covariance file for layer {layer} (looked for {paths[0]}); "
                             f"run: megedit stats {args.hparams}")
        eigenvalues, vectors = torch.linalg.eigh(read_covariance(found[0]))
        k = keys[name]  # (n, d_k)
        for threshold in args.thresholds:
            in_null = eigenvalues < threshold  # the directions alphaedit_main.null_space_projector keeps
            row = {"layer": layer, "threshold": threshold, "d_k": k.shape[1], "null_dim": int(in_null.sum()),
                   # trace(P C0) / trace(C0): how much of the preserved keys' energy the projection lets through
                   "preserved_share_in_null": float(eigenvalues[in_null].sum() / eigenvalues.sum()),
                   "median_key_share_in_null": 0.0, "key_rank_99_in_null": 0}
            if in_null.any():
                projected = k @ vectors[:, in_null]  # (n, m)
                row["median_key_share_in_null"] = float((projected.pow(2).sum(1) / k.pow(2).sum(1)).median())
                # how many independent directions the n keys need inside it (99% of their projected energy)
                energy = torch.linalg.svdvals(projected).pow(2).cumsum(0)
                row["key_rank_99_in_null"] = int((energy < 0.99 * energy[-1]).sum()) + 1
            rows.append(row)
    out = Path(args.out)
    write_json(out / "results.json", {"hparams": args.hparams, "data": args.data, "n": len(requests),
                                      "environment": environment(), "rows": rows, "command": " ".join(sys.argv)})
    lines = [f"AlphaEdit null space ({args.hparams}), keys of the first {len(requests)} requests of {args.data}", "",
             "| layer | threshold | null dim / d_k | preserved energy in null | median edit-key energy in null | "
             "edit-key rank (99%) in null |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['threshold']:g} | {r['null_dim']} / {r['d_k']} | {r['preserved_share_in_null']:.4f}"
              f" | {r['median_key_share_in_null']:.4f}"
              f" | {r['key_rank_99_in_null']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
