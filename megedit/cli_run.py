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
    p.add_argument("--keep", metavar="DIR", help="also write a kept result to DIR (e.g. bench/results/<run>): "
                   "results.json and results.md with every method's metrics, EasyEdit's own numbers, hparams, this "
                   "command, the git commit, machine, package versions, seed and times (no weights)")
    p.set_defaults(func=main)


def main(args) -> int:
    from .report import kind_rows, markdown_table, ordered, result_row
    from .runner import load_config, run

    cfg = load_config(args.config, output=args.output, sizes=args.sizes)
    args.on_interrupt = (f"finished results under {cfg.output}/results are kept, and MEMIT/AlphaEdit's z vectors and "
                         "MeG's stages are cached: run the same command again to continue from there")
    if args.keep:
        from .keep import check_keep_target, git_state

        check_keep_target(args.keep)
        args.git_at_start = git_state()  # the code that runs, whatever is committed while it runs
    start = time.time()
    records = ordered([m.name for m in cfg.methods], run(cfg, progress=not args.no_progress))
    print(markdown_table([result_row(r, cfg.metrics) for r in records]))
    per_kind = kind_rows(records)
    if per_kind:  # locality and portability of each kind (KnowEdit's same-subject Relation_Specificity, ...)
        print("\n" + markdown_table(per_kind))
    print(f"results: {cfg.output}/results.md, .csv, .json, .png ({time.time() - start:.0f} s wall)")
    if args.keep:
        kept = keep_run_result(args.keep, cfg, records, getattr(args, "command_line", None), args.git_at_start)
        print(f"kept: {kept}/results.md")
    return 0


def easyedit_source() -> str | None:
    """The folder EasyEdit was imported from: the installed wheel's, or a GitHub source put first on the path (whose
    version the package metadata does not know)."""
    import importlib.util
    from pathlib import Path

    import os

    spec = importlib.util.find_spec("easyeditor")
    if not (spec and spec.origin):
        return None
    folder = Path(spec.origin).parent.parent
    return "the installed package" if "site-packages" in folder.parts else os.path.relpath(folder)


def keep_run_result(folder, cfg, records: list[dict], command: str | None = None, git: dict | None = None):
    """Every (method, size) of the run as one kept result (``megedit.keep``)."""
    from pathlib import Path

    from .keep import keep
    from .peak_memory import reported_gb
    from .records import REPORTABLE

    rows, config, per_kind, seconds = [], {}, {}, {}
    for r in records:
        key = f"{r['method']} n={r['n']}"
        rows.append({"method": r["method"], "n": r["n"], "data": str(cfg.data_path),
                     **{m: v for m, v in r["summary"].items() if m in REPORTABLE}, "edit_s": r["edit_seconds"],
                     "peak_gb": reported_gb(r["peak_rss_gb"], r.get("peak_cuda_gb")),
                     "easyedit": r["easyedit"], "z_reused": r.get("z_reused", 0),
                     "resumed": bool((r.get("meg_report") or {}).get("resumed")),
                     "easyedit_api": r.get("easyedit_api"),
                     "implementation": (r.get("implementation") or {}).get("code")})
        config[key] = {"hparams_file": r["hparams_file"], "hparams": r["hparams"]}
        per_kind[key] = {k: v for k, v in r["summary"].items() if k not in REPORTABLE}
        meg = r.get("meg_report") or {}
        seconds[key] = {**meg.get("seconds", {}), "edit": r["edit_seconds"], "batch_edit": r["batch_edit_seconds"]}
    return keep(folder, Path(folder).name, rows, cfg.seed, config, per_kind, seconds,
                extra={"run_config": str(cfg.path), "easyedit_source": easyedit_source(), "training_texts_left_out": {
                    f"{r['method']} n={r['n']}": r["meg_report"]["leakage"] for r in records
                    if (r.get("meg_report") or {}).get("leakage")}}, command=command, git=git)
