"""``megedit edit <hparams.yaml> --data <file> --n N``: apply MeG, print metrics before/after and each stage's time.

Data-parallel over N processes (training and scoring; see ``megedit.distributed``), e.g. on CPU::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m megedit.cli edit hparams/MeG/smollm2-135m.yaml --data counterfact/... --num-edits 1000
    torchrun --nproc_per_node 2 -m megedit.cli edit hparams/MeG/smollm2-135m.yaml --data counterfact/... --num-edits 1000

On GPUs drop ``ACCELERATE_USE_CPU=true`` and set ``device: cuda`` (each process takes the GPU of its LOCAL_RANK).
Each rank scores a share of the evaluated requests; rank 0 alone gathers, prints and writes results.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import yaml

from .records import METRICS


def gathered(result: dict, n: int) -> dict:
    """Every rank's ``evaluate_requests`` result on its share of ``n`` requests (every ranks-th, from its rank on),
    put back in request order and summarised; in one process the result itself."""
    from . import distributed
    from .evaluate import summarise

    ranks = distributed.world_size()
    if ranks == 1:
        return result
    per: list = [None] * n
    for r, part in enumerate(distributed.all_gather_objects(result["per_request"])):
        per[r::ranks] = part
    return {"per_request": per, "summary": summarise(per)}


def add_parser(sub) -> None:
    p = sub.add_parser("edit", help="apply MeG to the hparams' model and report Rel/Gen/Loc before and after")
    p.add_argument("hparams", help="MeG hparams YAML, e.g. hparams/MeG/smollm2-135m.yaml")
    p.add_argument("--data", required=True, help="edit requests (CounterFact, ROME CounterFact, MEND zsRE or KnowEdit "
                   "JSON)")
    p.add_argument("--format", default="auto", help="data format: auto, counterfact, counterfact-rome, zsre, knowedit")
    p.add_argument("--split", choices=("validation", "reported"), help="only this part of the file (a fixed ~30/70 "
                   "split by record position, megedit.knowedit.split_of): choose settings on validation, report on "
                   "reported; --n and --offset then count within the part")
    # under torchrun / accelerate launch write --num-edits: their parsers take --n for an abbreviation of their own
    p.add_argument("--n", "--num-edits", dest="n", type=int, default=100, help="number of edits")
    p.add_argument("--offset", type=int, default=0, help="first record to edit")
    p.add_argument("--drop-conflicts", action="store_true", help="leave out each request whose prompt an earlier one "
                   "edits to another target (CounterFact's first 10,000 hold 79); without it such data is refused")
    p.add_argument("--eval-n", type=int, help="evaluate a uniform sample of this many edits, drawn with the hparams' "
                   "seed (all --n are edited); for runs whose full evaluation would cost hours, e.g. 10,000 on a CPU")
    p.add_argument("--pseudo-data", help="pseudo-edit pool (overrides pseudo_edit_data in the hparams)")
    p.add_argument("--device", help="overrides device in the hparams")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any hparams field")
    p.add_argument("--probe-questions", help="requests file whose locality prompts are unrelated questions for the "
                   "gate probe, e.g. zsre/zsre_mend_train-1k.json (NQ questions)")
    p.add_argument("--out", default="results/edit", help="folder for results.json")
    p.add_argument("--overwrite", action="store_true", help="replace the results.json an earlier run left in --out "
                   "(without it such a folder is refused before any work)")
    p.add_argument("--keep", metavar="DIR", help="also write a kept result to DIR (e.g. bench/results/<run>): "
                   "results.json and results.md with the metrics, per-kind rates, hparams, this command, the git "
                   "commit, machine, package versions, seed and stage times (no weights); bench/tables.py reads them")
    p.add_argument("--save", metavar="DIR", help="also save the edit (encoder, gate, generator, hparams, base-model "
                   "fingerprint) to DIR; reload it with MeGModel.from_pretrained(model, tokenizer, DIR)")
    p.set_defaults(func=main)


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ValueError(f"--set {key}: value {value!r} is not valid YAML ({problem}); quote strings that hold "
                             "YAML's special characters, e.g. --set 'key=\"a: b\"'") from None
    return out


def format_table(pre: dict, post: dict) -> str:
    """The six metrics and Score, then each locality/portability kind's TF and AG (``loc_tf.<kind>``, ...)."""
    from .evaluate import kind_metrics

    names = [*METRICS, "score", *kind_metrics(post)]
    width = max(8, *(len(m) for m in names))
    rows = [f"{'metric':<{width}} {'pre':>7} {'post':>7}"]
    for m in names:
        rows.append(f"{m:<{width}} {pre.get(m, float('nan')):7.1f} {post.get(m, float('nan')):7.1f}")
    return "\n".join(rows)


def model_config(model_name: str):
    """The model's config alone (no weights), to check hparams against it early."""
    from transformers import AutoConfig

    from .loading import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(model_name))
    except (OSError, ValueError) as e:
        raise ValueError(f"hparams field 'model_name' = {model_name!r}: cannot read its config ({e}); set it to a "
                         "builtin (smollm2-135m), a local model folder or a hub id") from None


def peak_memory_of_ranks(memory) -> dict:
    """The run's peak memory from every rank's ``PeakMemory``: on a GPU the largest device's peak, on a CPU the sum of
    the processes' resident peaks (they share the machine's memory; the sum bounds it from above)."""
    from . import distributed
    from .peak_memory import reported_gb

    per_rank = distributed.all_gather_objects((memory.peak_rss, memory.peak_cuda))
    rss = [r / 2**30 for r, _ in per_rank]
    cuda = [c / 2**30 for _, c in per_rank if c is not None]
    peak = {"peak_gb": reported_gb(sum(rss), max(cuda) if cuda else None), "rss_gb_per_rank": rss}
    if cuda:
        return {**peak, "what": "largest GPU's allocated peak", "cuda_gb_per_rank": cuda}
    return {**peak, "what": "resident" if len(rss) == 1 else f"sum of {len(rss)} processes' resident peaks"}


def evaluation_sample(requests: list[dict], eval_n: int | None, seed: int) -> list[dict]:
    """The requests to evaluate: all of them, or ``eval_n`` drawn uniformly with ``seed``, in edit order."""
    if eval_n is None or eval_n == len(requests):
        return requests
    if not 0 < eval_n <= len(requests):
        raise ValueError(f"--eval-n must be between 1 and the number of edits ({len(requests)}), got {eval_n}")
    return [requests[i] for i in sorted(random.Random(seed).sample(range(len(requests)), eval_n))]


def main(args) -> int:
    from . import apply_meg_to_model, distributed, evaluate_requests, load_model, load_requests, locality_reference
    from .arch import check_config, check_layer
    from .records import environment, write_json
    from .data import drop_conflicts, validate_requests
    from .hparams import MeGHyperParams
    from .loading import check_device
    from .meg_main import MEG_NEEDS_SUBJECT, load_pool
    from .paths import check_results_folder, check_writable_folder
    from .peak_memory import PeakMemory
    from .probe import gate_probe

    distributed.init()  # under a launcher: join the other processes (nothing in a single process)
    hp = MeGHyperParams.from_hparams(args.hparams)
    changes = parse_overrides(args.set)
    if args.pseudo_data:
        changes["pseudo_edit_data"] = args.pseudo_data
    if args.device:
        changes["device"] = args.device
    hp = MeGHyperParams.from_dict({**hp.to_dict(), **changes}, source=f"{args.hparams} + overrides")
    loaded = load_requests(args.format, args.data, n=args.n, offset=args.offset, split=args.split)
    requests, dropped = loaded, []
    if args.drop_conflicts:
        requests, positions = drop_conflicts(loaded)
        dropped = [loaded[i]["case_id"] for i in positions]
        if dropped:
            print(f"--drop-conflicts: left out {len(dropped)} of {len(loaded)} requests (an earlier one edits their "
                  f"prompt to another target): case_ids {dropped}")
    requests = validate_requests(requests, need_subject=MEG_NEEDS_SUBJECT)
    evaluated = evaluation_sample(requests, args.eval_n, hp.seed)
    if hp.pseudo_edit_data:
        from .data import resolve_data_path

        resolve_data_path(hp.pseudo_edit_data)  # fail now, not after loading the model
    check_config(model_config(hp.model_name), hp.layer)  # layer range and architecture, before loading weights
    check_device(hp.device)
    # every folder the run writes, now: an unwritable one must not surface after training
    check_results_folder(args.out, args.overwrite)
    if hp.checkpoint_dir:
        check_writable_folder(hp.checkpoint_dir, "hparams field 'checkpoint_dir'")
        args.on_interrupt = (f"the work finished so far is checkpointed under {hp.checkpoint_dir}: run the same "
                             "command again to resume there")
    else:
        args.on_interrupt = ("nothing was saved (the hparams set no checkpoint_dir); run the command again to start "
                             "over, or set checkpoint_dir to make a long run resumable")
    if args.save:
        from .artifact import check_save_target

        check_save_target(args.save)
        check_writable_folder(Path(args.save).expanduser().absolute().parent, "--save's parent folder")
    if args.keep:
        from .keep import check_keep_target, git_state

        check_keep_target(args.keep)
        args.git_at_start = git_state()  # the code that runs, whatever is committed while it runs
    questions = []
    if args.probe_questions:
        from .probe import locality_prompts

        questions = [p for r in load_requests("auto", args.probe_questions) for p in locality_prompts(r)]
    with PeakMemory() as memory:
        started = time.time()
        model, tok = load_model(hp)
        check_layer(model, hp.layer)
        load_s = time.time() - started

        # train first, then evaluate the base model: a run resumed from its checkpoint over several sessions spends
        # no time on evaluation until training is done. The base model answers as before: the neuron is off outside
        # MeGModel calls.
        edited, _ = apply_meg_to_model(model, tok, requests, hp)
        if args.save and distributed.is_main():
            edited.save_pretrained(args.save)  # before evaluation: a crash there does not lose the edit
        # under a launcher each rank scores every ranks-th evaluated request, and rank 0 gathers them
        ranks, main = distributed.world_size(), distributed.is_main()
        mine = evaluated[distributed.rank()::ranks]
        t0 = time.time()
        reference = locality_reference(model, tok, mine, hp.eval_batch_size)
        pre = gathered(evaluate_requests(model, tok, mine, reference, hp.eval_batch_size, progress=main),
                       len(evaluated))
        pre_s = time.time() - t0
        t0 = time.time()
        post = gathered(evaluate_requests(edited, tok, mine, reference, hp.eval_batch_size, progress=main),
                        len(evaluated))
        post_s = time.time() - t0
    peak = peak_memory_of_ranks(memory)  # every rank takes part
    if not main:
        return 0
    report = edited.report
    report["gate_probe"] = gate_probe(edited.edit, evaluated, load_pool(requests, hp), questions, trained_on=requests)

    sampled = f", evaluated on {len(evaluated)} of them (uniform sample, seed {hp.seed})" \
        if len(evaluated) < len(requests) else ""
    part = f" ({args.split} part)" if args.split else ""
    print(f"\nMeG on {hp.model_name}, {len(requests)} edits from {args.data}{part}{sampled}")
    print(format_table(pre["summary"], post["summary"]))
    gate = report.get("gate", {})
    print(f"\ngate: epsilon={gate.get('epsilon', float('nan')):.4f}  calibration: familiar passed "
          f"{gate.get('familiar_pass', float('nan')):.3f}, near misses blocked {gate.get('near_miss_blocked', {})}")
    probe = report["gate_probe"]
    print("gate on fresh queries (fraction judged familiar; n): " + ", ".join(
        f"{k} {v:.3f} ({probe['n'][k]})" for k, v in probe["familiar_rate"].items()))
    print(f"neuron fits reproducing the target: {report['fit']['ok']:.3f}")
    leakage = report["leakage"]
    print(f"training texts left out because they contain, or lie inside, one of the edit set's "
          f"{leakage['evaluation_texts']} evaluation texts: {leakage['left_out_total']} "
          f"({', '.join(f'{k} {v}' for k, v in leakage['left_out'].items() if v) or 'none'})")
    print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                   {"load": load_s, "pre-eval": pre_s, **report["seconds"], "post-eval": post_s}.items()))
    print(f"peak memory: {peak['peak_gb']:.2f} GB ({peak['what']})")
    out = Path(args.out) / "results.json"
    write_json(out, {"method": "MeG", "hparams": hp.to_dict(), "seed": hp.seed, "data": str(args.data),
                     "n": len(requests), "offset": args.offset, "split": args.split,
                     "dropped_conflicting_case_ids": dropped,
                     "n_evaluated": len(evaluated),
                     "evaluated_case_ids": [r.get("case_id") for r in evaluated], "saved_edit": args.save,
                     "environment": environment(),
                     "pre": pre["summary"], "post": post["summary"], "report": report,
                     "training_texts_left_out": report["leakage"],
                     "per_request_post": post["per_request"], "peak_memory": peak,
                     "seconds": {"load": load_s, "pre_eval": pre_s, **report["seconds"], "post_eval": post_s}})
    print(f"results: {out}")
    if args.keep:
        print(f"kept: {keep_edit_result(args, hp, requests, evaluated, pre, post, report, load_s, pre_s, post_s, peak)}"
              "/results.md")
    return 0


def keep_edit_result(args, hp, requests, evaluated, pre, post, report, load_s, pre_s, post_s, peak):
    """The run as a kept result (``megedit.keep``): one MeG row, its gate's rates per query kind, its stage times."""
    from .keep import keep

    metrics = {k: v for k, v in post["summary"].items() if k in (*METRICS, "score")}
    row = {"method": "MeG", "n": len(requests), "n_evaluated": len(evaluated), "data": str(args.data), **metrics,
           "edit_s": sum(report["seconds"].values()), "peak_gb": peak["peak_gb"]}
    per_kind = {f"{k} (post)": v for k, v in post["summary"].items() if k not in (*METRICS, "score")}
    per_kind.update({f"gate familiar: {k}": v for k, v in report["gate_probe"]["familiar_rate"].items()})
    return keep(args.keep, Path(args.keep).name, [row], hp.seed, {"MeG": {"hparams_file": args.hparams,
                                                                          "hparams": hp.to_dict()}},
                {"MeG": per_kind}, {"MeG": {"load": load_s, "pre_eval": pre_s, **report["seconds"],
                                            "post_eval": post_s}},
                extra={"pre": {"MeG": pre["summary"]}, "training_texts_left_out": {"MeG": report["leakage"]},
                       "evaluated_case_ids": [r.get("case_id") for r in evaluated],
                       "gate": {"MeG": report.get("gate")}, "fit": {"MeG": report.get("fit")},
                       "peak_memory": {"MeG": peak}},
                command=getattr(args, "command_line", None), git=args.git_at_start)
