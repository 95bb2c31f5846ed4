"""How many training texts would leak evaluation texts of the edit set, without and with the check (megedit/leakage.py).

    MEGEDIT_DATA=../shared/data python bench/leakage.py hparams/MeG/smollm2-135m.yaml \\
        --data counterfact/counterfact-edit.json --n 1000

Builds every training text MeG's stages would learn from (views with and without the target, near misses with their
answers, calibration queries, encoder pairs) twice: as they were before the check ("before": nothing left out but an
edit's own exact evaluation prompts) and as training now builds them ("after"), and counts, per kind, the distinct
texts that contain or lie inside an evaluation text of any request. An edit's own prompt is not counted: it is the
edited fact, always trained on. No model is loaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit import MeGHyperParams, load_requests  # noqa: E402
from megedit.encoder import training_columns  # noqa: E402
from megedit.leakage import HeldOutTexts  # noqa: E402
from megedit.meg_main import build_texts, load_pool  # noqa: E402


def training_texts(requests, pool, hp, held_out: HeldOutTexts) -> dict[str, set[str]]:
    texts = build_texts(requests, pool, hp, held_out)
    columns = training_columns(pool, hp.encoder_pairs, hp.encoder_hard_negatives, hp.seed, held_out) \
        if hp.encoder_tune else []
    views = [(t, r["target_new"]) for v, r in zip(texts.views, requests) for t in v[1:]]
    return {"views": {t for t, _ in views} | {f"{t} {a}" for t, a in views}, "negatives": set(texts.negatives),
            "calibration": set(texts.calib_familiar) | {t for ts in texts.calib_unfamiliar.values() for t in ts},
            "encoder_pairs": {t for column in columns for t in column}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hparams")
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args(argv)
    hp = MeGHyperParams.from_hparams(args.hparams)
    requests = load_requests(args.format, args.data, n=args.n)
    pool = load_pool(requests, hp)
    start = time.time()
    judge = HeldOutTexts(requests)
    print(f"{args.n} edits of {args.data}: {len(judge)} evaluation texts (indexed in {time.time() - start:.2f} s)")
    for label, held_out in (("before", HeldOutTexts([])), ("after", HeldOutTexts(requests))):
        start = time.time()
        groups = training_texts(requests, pool, hp, held_out)
        built = time.time() - start
        leaking = {k: sum(judge.leaks(t) for t in v) for k, v in groups.items()}
        print(f"{label}: distinct leaking training texts {leaking} (total {sum(leaking.values())}) of "
              f"{sum(len(v) for v in groups.values())}; built in {built:.1f} s" +
              (f"; left out while building: {held_out.report()['left_out']}" if label == "after" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
