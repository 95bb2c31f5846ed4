"""YAML-configured comparisons: every method edits the same requests through EasyEdit's ``BaseEditor``.

A config (``examples/quick_compare.yaml``; every key is described in ``megedit.run_config``) names the model, the
data, the sizes, the methods (hparams YAMLs) and the metrics; ``load_config`` reads and checks it, ``run`` runs it.

For each (method, size) a fresh editor loads the model, ``batch_edit`` applies all edits in one call (EasyEdit's own
teacher-forced metrics come back from it), then megedit's ``evaluate_requests`` scores the edited model (TF and
greedy AG, locality against the unedited model). Each result is written as soon as it is done and skipped on a
re-run; MEMIT/AlphaEdit target vectors are cached per case and MeG's stages are checkpointed under
``<output>/checkpoints`` (unless its hparams set ``checkpoint_dir``), so an interrupted run resumes where it stopped (the
table then says how many z were read from the cache, as their time is not in the edit time, or that MeG's time adds up
the sessions).
Outputs (megedit/report.py): ``results.json``, ``results.csv``, ``results.md`` (methods × sizes) and ``results.png``.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import multiprocessing
import os
import random
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import report
from .baselines.z_cache import with_z_cache, z_cache_template
from .data import drop_conflicts, load_requests, validate_requests
from .easyedit.requests import batch_edit_inputs, in_api_terms, locality_inputs, with_evaluation_texts
from .evaluate import evaluate_requests, locality_reference
from .peak_memory import PeakMemory
from .records import environment, write_json
from .run_config import Method, RunConfig, load_config  # noqa: F401  (load_config: runner's entry point with run)


# ------------------------------------------------------------------------------------------------ one method
def seed_everything(seed: int) -> None:
    """MEMIT's context templates are sampled text: seeding makes them (and the z cache) reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def easyedit_summary(metrics: list[dict]) -> dict:
    """Means (in %) of EasyEdit's own teacher-forced numbers: rewrite, rephrase, locality (post) and pre."""
    def mean_of(values):
        flat = [float(v) for x in values for v in (x if isinstance(x, list) else [x])]
        return 100.0 * float(np.mean(flat)) if flat else math.nan

    out = {}
    for stage in ("pre", "post"):
        out[f"{stage}_rewrite_acc"] = mean_of([m[stage]["rewrite_acc"] for m in metrics if "rewrite_acc" in m[stage]])
        out[f"{stage}_rephrase_acc"] = mean_of([m[stage]["rephrase_acc"] for m in metrics
                                                if "rephrase_acc" in m[stage]])
    out["post_locality_acc"] = mean_of([v for m in metrics for k, v in m["post"].get("locality", {}).items()
                                        if k.endswith("_acc")])
    return out


def method_hparams(method: Method, cfg: RunConfig):
    """The method's hparams with the config's model/device and the method's ``set`` applied."""
    from .easyedit import load_hparams

    hp = load_hparams(method.hparams)
    for key, value in {**({"model_name": cfg.model} if cfg.model else {}),
                       **({"device": cfg.device} if cfg.device else {}), **method.overrides}.items():
        if not hasattr(hp, key):
            raise ValueError(f"method {method.name}: hparams have no field {key!r} to set")
        setattr(hp, key, value)
    return hp


def preflight(cfg: RunConfig, requests: list[dict]) -> None:
    """Checks that need each method's hparams and tokenizer, done for all methods before the first one edits: a
    problem with the last method must not surface after hours spent on the first."""
    from transformers import AutoTokenizer

    from .easyedit.requests import check_eval_lengths
    from .loading import resolve_model_path
    from .method_check import check_method_hparams
    from .paths import check_writable_folder

    inputs = batch_edit_inputs(requests)
    locality = locality_inputs(inputs["locality_prompts"], inputs["locality_ground_truth"], len(requests))
    check_writable_folder(cfg.output, "the run's output folder (config key 'output' or --output)")
    tokenizers, checked = {}, set()
    for method in cfg.methods:
        hp = check_method_hparams(method_hparams(method, cfg), f"method {method.name} ({method.hparams})")
        if getattr(hp, "checkpoint_dir", None):
            check_writable_folder(hp.checkpoint_dir, f"method {method.name}: hparams field 'checkpoint_dir'")
        name, max_length = hp.model_name, getattr(hp, "max_length", None)
        if not isinstance(name, str) or (name, max_length) in checked:  # same tokenizer and limit: same answer
            continue
        checked.add((name, max_length))
        if name not in tokenizers:
            try:
                tokenizers[name] = AutoTokenizer.from_pretrained(resolve_model_path(name))
            except (OSError, ValueError) as e:
                raise ValueError(f"method {method.name} ({method.hparams}): cannot load the tokenizer of model "
                                 f"{name!r} ({str(e).splitlines()[0]})") from None
        try:
            check_eval_lengths(tokenizers[name], max_length, inputs["prompts"], inputs["target_new"],
                               inputs["rephrase_prompts"], locality, case_ids=[r["case_id"] for r in requests])
        except ValueError as e:
            raise ValueError(f"method {method.name} ({method.hparams}): {e}") from None


def run_method(method: Method, requests: list[dict], cfg: RunConfig, log_path: Path, progress: bool = True) -> dict:
    """Edit ``requests`` with one method through BaseEditor; returns its result record."""
    from .easyedit import implementation, register

    api = register()
    from easyeditor import BaseEditor

    hp = method_hparams(method, cfg)
    if hp.alg_name == "MeG" and hp.checkpoint_dir is None:
        hp.checkpoint_dir = str(cfg.output / "checkpoints")  # like MEMIT's z cache: an interrupted run resumes
    if hp.alg_name != "MeG" and "batch_size" not in method.overrides:
        hp.batch_size = len(requests)  # one batch of all edits (MeG trains once on all anyway)
    seed_everything(cfg.seed)
    editor = BaseEditor.from_hparams(hp)
    z_reused = [0]
    if hp.alg_name == "MeG":
        editor.apply_algo = with_evaluation_texts(editor.apply_algo, requests)
    if hp.alg_name in ("MEMIT", "AlphaEdit"):
        editor.apply_algo = with_z_cache(editor.apply_algo, z_cache_template(cfg, method, hp),
                                          {r["prompt"]: r["case_id"] for r in requests}, z_reused)
    reference = locality_reference(editor.model, editor.tok, requests)
    start = time.time()
    with PeakMemory() as memory, open(log_path, "w", buffering=1) as log, contextlib.redirect_stdout(log):
        metrics, edited, _ = editor.batch_edit(**in_api_terms(api, batch_edit_inputs(requests)), verbose=False)
        batch_seconds = time.time() - start
        ours = evaluate_requests(edited, editor.tok, requests, reference, progress=progress)
    editing_seconds = float(sum(dict.fromkeys(m["time"] for m in metrics)))  # one value per chunk
    meg_report = getattr(edited, "report", None)
    if (meg_report or {}).get("resumed"):  # MeG resumed from its checkpoint: its edit time is every session's, added up
        editing_seconds = float(sum(meg_report["seconds"].values()))
    record = {"method": method.name, "alg_name": hp.alg_name, "hparams_file": method.hparams, "n": len(requests),
              "easyedit_api": api, "implementation": implementation(hp),
              "summary": ours["summary"], "easyedit": easyedit_summary(metrics), "edit_seconds": editing_seconds,
              "batch_edit_seconds": batch_seconds, "total_seconds": time.time() - start,
              "peak_rss_gb": memory.peak_rss / 2**30,
              "peak_cuda_gb": None if memory.peak_cuda is None else memory.peak_cuda / 2**30,
              "hparams": {k: v for k, v in vars(hp).items() if isinstance(v, (str, int, float, bool, list))},
              "per_request": ours["per_request"], "case_ids": [r["case_id"] for r in requests],
              "z_reused": z_reused[0], "meg_report": meg_report}
    del editor, edited
    gc.collect()
    return record


# ---------------------------------------------------------------------------------------------- whole run
def result_path(cfg: RunConfig, method: Method, n: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method.name)
    return cfg.output / "results" / f"{safe}__n{n}.json"


def fingerprint(cfg: RunConfig, method: Method, n: int) -> str:
    """Everything a result depends on: a finished result is reused only while this stays the same."""
    inputs = {"hparams": Path(method.hparams).read_text(), "set": method.overrides, "model": cfg.model,
              "device": cfg.device, "data": [cfg.data_format, cfg.data_path, cfg.offset], "n": n, "seed": cfg.seed}
    if cfg.drop_conflicts:  # keys that are added only when set leave the fingerprint of a run without them unchanged
        inputs["drop_conflicts"] = True
    if cfg.split:
        inputs["split"] = cfg.split
    from .easyedit import register

    if register() == "github":  # likewise: a result is reused only on the EasyEdit it was made with
        inputs["easyedit_api"] = "github"
    return hashlib.sha1(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Worker initializer: end this process once ``parent`` is gone, so that a killed ``megedit run`` does not leave
    its method running on (a busy worker reads nothing from the pool until its task ends)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_isolated(method: Method, requests: list[dict], cfg: RunConfig, log_path: Path, progress: bool = True) -> dict:
    """``run_method`` in a fresh process (``cfg.isolate``): its peak memory is its own, not the largest of every
    method run before it in this process, and nothing it loads or caches is seen by the next method."""
    if not cfg.isolate:
        return run_method(method, requests, cfg, log_path, progress)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        return pool.submit(run_method, method, requests, cfg, log_path, progress).result()


def run(cfg: RunConfig, progress: bool = True) -> list[dict]:
    """Run every (method, size) not yet done, then write the combined tables and plot; returns all records."""
    loaded = load_requests(cfg.data_format, cfg.data_path, n=max(cfg.sizes), offset=cfg.offset, split=cfg.split)
    requests, dropped = loaded, []  # dropped: positions among the loaded records
    if cfg.drop_conflicts:
        requests, dropped = drop_conflicts(loaded)
        if dropped:
            print(f"[megedit run] drop_conflicts: left out {len(dropped)} of {max(cfg.sizes)} requests (an earlier "
                  "one edits their prompt to another target)")
    requests = validate_requests(requests, need_subject=True)  # MEMIT-style methods locate the subject
    preflight(cfg, requests)
    (cfg.output / "logs").mkdir(parents=True, exist_ok=True)
    records = []
    for method in cfg.methods:
        for n in cfg.sizes:
            path = result_path(cfg, method, n)
            key = fingerprint(cfg, method, n)
            if path.exists():
                done = json.loads(path.read_text())
                if done.get("fingerprint") == key:
                    records.append(done)
                    continue
                print(f"[megedit run] {method.name} n={n}: settings changed since {path} was written; running again")
            print(f"[megedit run] {method.name}: {n} edits")
            log_path = cfg.output / "logs" / f"{path.stem}.log"
            left_out = [loaded[i]["case_id"] for i in dropped if i < n]  # the first n records, less these
            record = {**run_isolated(method, requests[:n - len(left_out)], cfg, log_path, progress),
                      "dropped_conflicting_case_ids": left_out, "fingerprint": key}
            write_json(path, record)
            records.append(record)
            print(f"[megedit run] {method.name} n={n}: score {record['summary']['score']:.1f}, "
                  f"edit {record['edit_seconds']:.0f}s, peak {record['peak_rss_gb']:.2f} GB")
    write_outputs(cfg, records)
    return records


def write_outputs(cfg: RunConfig, records: list[dict]) -> None:
    records = report.ordered([m.name for m in cfg.methods], records)
    rows = [report.result_row(r, cfg.metrics) for r in records]
    write_json(cfg.output / "results.json", {"config": str(cfg.path), "environment": environment(), "rows": rows,
                                             "kind_rows": report.kind_rows(records), "records": records})
    report.write_tables(cfg.output, cfg.name, rows, records)
    report.plot(rows, cfg.metrics, cfg.output / "results.png")
