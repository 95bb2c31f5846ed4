"""Fill a run config's z cache (MEMIT/AlphaEdit target vectors) ahead of `megedit run`, with several processes.

    python bench/precompute_z.py bench/configs/counterfact_baselines.yaml --device cuda --workers 12

z is 90% of MEMIT's cost on SmolLM2 here (≈14 s each on 2 CPU cores). It depends only on the unedited model, the
request and the z settings, and `megedit run` reads it per case from its z cache, so it can be computed before the run,
on another device, and by several processes at once (a small model leaves one process far from filling a GPU). This
script writes the files the run would write, in the folder the run reads, with EasyEdit's own ``compute_z``:

- the requests are the config's first ``--n`` (default: its largest size); files already there are kept;
- MEMIT computes z against context templates it samples from the model once per process. They are made here the way
  the run makes them (seeded with the config's seed, on the config's device) and handed to every worker, so z computed
  on a GPU for a CPU run uses the CPU run's templates;
- ``--check K`` first recomputes K cached z and prints how far they are from the cached ones (device differences);
- each call appends what it computed, where, and how fast to ``precompute_z.jsonl`` in the cache folder.

Only methods whose z settings are MEMIT's are served (MEMIT, AlphaEdit); with ``share_z: false`` each gets its folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megedit.baselines.z_cache import z_cache_template  # noqa: E402
from megedit.runner import load_config, method_hparams, seed_everything  # noqa: E402

Z_METHODS = ("MEMIT", "AlphaEdit")


def plan(config: str, n: int | None):
    """``(cfg, [(hparams, template, requests)])`` for each z cache folder the config's methods read."""
    from megedit.data import load_requests

    cfg = load_config(config)
    n = n or max(cfg.sizes)
    requests = load_requests(cfg.data_format, cfg.data_path, n, cfg.offset)
    folders = {}
    for method in cfg.methods:
        hp = method_hparams(method, cfg)
        if hp.alg_name in Z_METHODS:
            template = z_cache_template(cfg, method, hp)
            folders.setdefault(template, (hp, template, requests))
    if not folders:
        raise ValueError(f"{config}: none of its methods computes z ({', '.join(Z_METHODS)})")
    return cfg, list(folders.values())


def z_file(job) -> Path:
    from megedit.baselines.z_cache import z_cache_file

    hp, template, request = job
    return z_cache_file(template, hp, request["case_id"])


def context_templates(cfg, hp):
    """MEMIT's templates as `megedit run` samples them: seeded, on the run's device."""
    from megedit.baselines.alphaedit.alphaedit_main import memit_modules, easyedit_runtime
    from megedit.easyedit.loader import load_model_named, normalise_device

    main = memit_modules()[0]
    seed_everything(cfg.seed)
    model, tok = load_model_named(hp.model_name, normalise_device(hp.device))
    main.CONTEXT_TEMPLATES_CACHE = None
    with easyedit_runtime():
        templates = main.get_context_templates(model, tok)
    main.CONTEXT_TEMPLATES_CACHE = None
    return templates


class ZComputer:
    """EasyEdit's compute_z on one device, with fixed context templates (AlphaEdit's ``target_vectors``: the run's
    own code path, cache file format included)."""

    def __init__(self, hp, device: str, templates):
        from megedit.easyedit.loader import load_model_named

        self.device, self.templates = device, templates
        self.model, self.tok = load_model_named(hp.model_name, device)

    def __call__(self, hp, request: dict, template: str | None = None) -> np.ndarray:
        """z for ``request``; with ``template`` also written to (or read from) its cache file."""
        from megedit.baselines.alphaedit.alphaedit_main import prepared_requests, easyedit_runtime, target_vectors

        hp = copy.copy(hp)  # the wheel builds f"cuda:{hp.device}": an index there, "cpu" is mended by its runtime fixes
        hp.device = int(self.device.split(":")[1]) if self.device.startswith("cuda:") else self.device
        with easyedit_runtime():
            z = target_vectors(self.model, self.tok, prepared_requests([request]), hp, self.templates, template)
        return z[:, 0].numpy()


def worker(rank: int, workers: int, config: str, n: int | None, device: str, templates, deadline: float,
           done) -> None:
    """Every ``workers``-th z from ``rank``. The plan is rebuilt here: hparams objects do not cross processes
    (unpickling them would import EasyEdit without megedit's import shims)."""
    import contextlib

    _, folders = plan(config, n)
    jobs = [(hp, template, r) for hp, template, requests in folders for r in requests]
    computer = None
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # compute_z prints every step
        for i, job in enumerate(jobs):
            path = z_file(job)
            if i % workers != rank or path.exists():
                continue
            if time.time() > deadline:
                break
            hp, template, request = job
            computer = computer or ZComputer(hp, device, templates)
            computer(hp, request, template)
            done.append((path.parent.name, path.name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a `megedit run` config with MEMIT and/or AlphaEdit")
    ap.add_argument("--n", type=int, default=None, help="first n requests (default: the config's largest size)")
    ap.add_argument("--device", default="cpu",
                    help="where to compute z (default cpu); the run's device stays the config's")
    ap.add_argument("--workers", type=int, default=1, help="processes on that device (default 1)")
    ap.add_argument("--seconds", type=float, default=None, help="stop starting new z after this long")
    ap.add_argument("--check", type=int, default=0, help="first recompute this many cached z and report the difference")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    from megedit.easyedit.loader import normalise_device

    args.device = normalise_device(args.device)
    start = time.time()
    cfg, folders = plan(args.config, args.n)
    templates = context_templates(cfg, folders[0][0])
    jobs = [(hp, template, r) for hp, template, requests in folders for r in requests]
    todo = sum(not z_file(job).exists() for job in jobs)
    print(f"{len(jobs)} z in {len(folders)} folder(s), {len(jobs) - todo} cached, {todo} to compute", flush=True)

    check = []
    cached = [job for job in jobs if z_file(job).exists()][:args.check]
    if cached:
        computer = ZComputer(cached[0][0], args.device, templates)
        for job in cached:
            hp, _, r = job
            old = np.load(z_file(job))["v_star"]
            check.append(float(np.linalg.norm(computer(hp, r) - old) / np.linalg.norm(old)))
        print(f"check: {len(check)} cached z recomputed on {args.device}: relative difference median "
              f"{np.median(check):.1e}, max {max(check):.1e}", flush=True)
        del computer

    deadline = time.time() + args.seconds if args.seconds else float("inf")
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        done = manager.list()
        procs = [ctx.Process(target=worker, args=(k, args.workers, args.config, args.n, args.device, templates,
                                                  deadline, done)) for k in range(args.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        done = list(done)
    seconds = time.time() - t0
    left = sum(not z_file(job).exists() for job in jobs)
    print(f"computed {len(done)} z in {seconds:.0f} s on {args.device} with {args.workers} process(es) "
          f"({len(done) / max(seconds, 1e-9):.2f} z/s); {left} still missing", flush=True)
    for _, template, _ in folders:
        folder = Path(template).parent
        files = sorted(name for owner, name in done if owner == folder.name)
        entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "config": args.config, "device": args.device,
                 "workers": args.workers, "computed": len(files), "seconds": round(seconds, 1),
                 "templates": templates, "check_relative_difference": check, "files": files,
                 "total_seconds": round(time.time() - start, 1)}
        with open(folder / "precompute_z.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
