"""``megedit stats <hparams.yaml>``: the covariance files MEMIT/AlphaEdit need, from local text (megedit/stats.py)."""
from __future__ import annotations


def _layers(text: str) -> list[int]:
    """"3,5-8" -> [3, 5, 6, 7, 8]."""
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            layers += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--layers expects numbers and ranges like 3,5-8, got {text!r}") from None
    return layers


def add_parser(sub) -> None:
    from .stats import DEFAULT_SOURCES

    p = sub.add_parser("stats", help="precompute MEMIT/AlphaEdit covariance statistics in EasyEdit's file layout")
    p.add_argument("hparams", help="MEMIT or AlphaEdit hparams YAML (model_name, layers, rewrite_module_tmp, "
                                   "stats_dir, mom2_dataset, mom2_n_samples, mom2_dtype)")
    p.add_argument("--data", help="folder the text sources are relative to (default: $MEGEDIT_DATA)")
    p.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES),
                   help="JSON files of CounterFact (train split!) or UnKEBench records; default: %(default)s")
    p.add_argument("--layers", type=_layers, help="layers to compute instead of the hparams' list, e.g. 3-12")
    p.add_argument("--device", help="overrides the hparams' device")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass (default %(default)s)")
    p.add_argument("--force", action="store_true", help="recompute files that already exist")
    p.set_defaults(func=main)


def main(args) -> int:
    from .stats import precompute_stats, read_stats_hparams

    hp = read_stats_hparams(args.hparams)
    if hp["mom2_dataset"] in ("wikipedia", "wikitext"):
        print(f"note: these statistics come from local text (--sources), not {hp['mom2_dataset']}; they are written "
              f"under the name the hparams use ({hp['mom2_dataset']}_stats)")
    written = precompute_stats(args.hparams, layers=args.layers, sources=args.sources, data_dir=args.data,
                               device=args.device, force=args.force, batch_tokens=args.batch_tokens)
    if not written:
        print("all statistics files already exist (use --force to recompute)")
    for path in written:
        print(path)
    return 0
