"""YAML-configured comparisons: every method edits the same requests through EasyEdit's ``BaseEditor``.

A config (see ``examples/quick_compare.yaml``)::

    model: smollm2-135m            # optional: replaces each method's model_name
    device: cpu                    # optional: replaces each method's device
    data: {format: counterfact, path: counterfact/counterfact-edit.json, offset: 0}
                                   # (KnowEdit: {format: knowedit, path: ..., split: validation}: one part of the
                                   # file, megedit.knowedit.split_of; offset and sizes count within it)
    sizes: [100]                   # numbers of edits; each size uses the first n requests
                                   # (data: {..., drop_conflicts: true}: less those whose prompt an earlier request
                                   # edits to another target; without it such requests stop the run before it starts)
    methods:                       # hparams YAMLs, or {hparams: ..., name: ..., set: {field: value}}
      - hparams/MeG/smollm2-135m.yaml
      - hparams/MEMIT/smollm2-135m.yaml
    metrics: [rel_tf, rel_ag, gen_tf, gen_ag, loc_tf, loc_ag, score]
    output: runs/quick_compare
    seed: 0
    isolate: true                  # each (method, size) in its own process: its own time and peak memory
    z_cache: runs/z_cache          # optional (default <output>/z_cache): MEMIT/AlphaEdit target vectors per case
    share_z: false                 # true: methods with equal z settings share them (sweeps); false: one per method

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import report
from .yaml_file import read_yaml_mapping
from .data import drop_conflicts, load_requests, validate_requests
from .knowedit import SPLITS, first_item
from .evaluate import METRICS, evaluate_requests, locality_reference

CONFIG_KEYS = {"name", "model", "device", "data", "sizes", "methods", "metrics", "output", "seed", "isolate", "z_cache",
               "share_z"}
REPORTABLE = (*METRICS, "score")
# What EasyEdit's compute_z reads (clamp_norm_factor and the layer are in the file name); max_length is not.
Z_SETTINGS = ("v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "kl_factor", "fact_token",
              "layer_module_tmp", "ln_f_module", "lm_head_module")


@dataclass
class Method:
    hparams: str
    name: str
    overrides: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    path: Path
    data_format: str
    data_path: str
    offset: int
    sizes: list[int]
    methods: list[Method]
    output: Path
    metrics: list[str]
    model: str | None = None
    device: str | None = None
    seed: int = 0
    name: str = "comparison"
    isolate: bool = True
    z_cache: Path | None = None
    share_z: bool = False
    drop_conflicts: bool = False
    split: str | None = None  # "validation" / "reported": that part of the file only (megedit.knowedit)


def load_config(path: str | Path, output: str | None = None, sizes: list[int] | None = None) -> RunConfig:
    """Read and check a run config; every error names the key to fix. ``sizes`` replaces the config's (a run of
    some of its sizes now, the rest later: finished results and z vectors are reused, sizes are not in their keys)."""
    p = Path(path)
    raw = read_yaml_mapping(p, "run config")
    unknown = sorted(set(raw) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{p}: unknown key(s) {unknown}; known: {sorted(CONFIG_KEYS)}")
    for key in ("data", "sizes", "methods"):
        if key not in raw:
            raise ValueError(f"{p}: missing key {key!r}")
    data = raw["data"]
    if not isinstance(data, dict) or "path" not in data:
        raise ValueError(f"{p}: data must be a mapping with 'path' (and optional 'format', 'offset', "
                         "'drop_conflicts', 'split')")
    unknown = sorted(set(data) - {"path", "format", "offset", "drop_conflicts", "split"})
    if unknown:
        raise ValueError(f"{p}: unknown data key(s) {unknown}; known: drop_conflicts, format, offset, path, split")
    if data.get("split") not in (None, *SPLITS):
        raise ValueError(f"{p}: data.split must be one of {list(SPLITS)}, got {data['split']!r}")
    if not isinstance(data.get("drop_conflicts", False), bool):
        raise ValueError(f"{p}: data.drop_conflicts must be true or false, got {data['drop_conflicts']!r}")
    where, given = (f"{p}: sizes", raw["sizes"]) if sizes is None else ("--sizes", sizes)
    sizes = given if isinstance(given, list) else [given]
    if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
        raise ValueError(f"{where} must be positive integers, got {given!r}")
    metrics = raw.get("metrics", list(REPORTABLE))
    bad = sorted(set(metrics) - set(REPORTABLE))
    if bad:
        raise ValueError(f"{p}: unknown metric(s) {bad}; choose from {list(REPORTABLE)}")
    methods = [_method(m, p) for m in raw["methods"] or []]
    if not methods:
        raise ValueError(f"{p}: methods is empty")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: method names must be unique, got {names} (give repeated files a 'name')")
    for key in ("isolate", "share_z"):
        if not isinstance(raw.get(key, False), bool):
            raise ValueError(f"{p}: {key} must be true or false, got {raw[key]!r}")
    out = Path(output or raw.get("output") or Path("runs") / p.stem)
    return RunConfig(p, data.get("format", "auto"), str(data["path"]), int(data.get("offset", 0)), sorted(set(sizes)),
                     methods, out, list(metrics), raw.get("model"), raw.get("device"), int(raw.get("seed", 0)),
                     str(raw.get("name", p.stem)), raw.get("isolate", True),
                     Path(raw.get("z_cache") or out / "z_cache"), raw.get("share_z", False),
                     data.get("drop_conflicts", False), data.get("split"))


def _method(entry, source: Path) -> Method:
    if isinstance(entry, str):
        entry = {"hparams": entry}
    if not isinstance(entry, dict) or "hparams" not in entry or set(entry) - {"hparams", "name", "set"}:
        raise ValueError(f"{source}: each method is an hparams path or {{hparams, name, set}}, got {entry!r}")
    hp_path = Path(entry["hparams"])
    if not hp_path.is_absolute() and not hp_path.exists() and (source.parent / hp_path).exists():
        hp_path = source.parent / hp_path
    if not hp_path.exists():
        raise FileNotFoundError(f"{source}: hparams file {entry['hparams']!r} does not exist")
    name = entry.get("name") or f"{hp_path.parent.name}/{hp_path.stem}"
    return Method(str(hp_path), name, dict(entry.get("set") or {}))


# ------------------------------------------------------------------------------------------------ one method
class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled), and peak CUDA memory where there is one."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_rss, self._stop = interval, 0, threading.Event()

    def _rss(self) -> int:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def seed_everything(seed: int) -> None:
    """MEMIT's context templates are sampled text: seeding makes them (and the z cache) reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _z_cache_template(cfg: RunConfig, method: Method, hp) -> str:
    """EasyEdit's cache_template ({z layer}, {clamp}, {case_id}) in a folder named by everything else z depends on
    (case ids are only unique within one data file, so the file is part of the name) and, unless ``share_z``, by the
    method, so that each method's edit time includes computing its own target vectors."""
    settings = {k: getattr(hp, k, None) for k in Z_SETTINGS}
    owner = {} if cfg.share_z else {"method": method.name}
    key = json.dumps({"model": hp.model_name, "seed": cfg.seed, "data": cfg.data_path, **owner, **settings},
                     sort_keys=True, default=str)
    folder = cfg.z_cache / hashlib.sha1(key.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(key)
    return str(folder / "z_layer{}_clamp{}_case{}.npz")


def _with_z_cache(apply, template: str, case_ids: dict[str, object], reused: list[int]):
    """EasyEdit's batch_edit passes no cache_template and drops case_id: put both back for MEMIT-style methods, and
    count in ``reused`` the target vectors that will come from the cache rather than be computed."""

    def call(model, tok, requests, hparams, **kwargs):
        for r in requests:
            r.setdefault("case_id", case_ids[r["prompt"]])
        from .baselines.alphaedit.alphaedit_main import z_cache_file

        reused[0] += sum(z_cache_file(template, hparams, r["case_id"]).exists() for r in requests)
        return apply(model, tok, requests, hparams, cache_template=template, **kwargs)

    return call


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


def _neighbour(request: dict) -> dict:
    """The locality prompt EasyEdit's own numbers get: the neighbourhood one, else the first item of the first kind."""
    locality = request.get("locality") or {}
    return first_item(locality.get("neighborhood") or next(iter(locality.values()), {}))


def _all_or_none(requests: list[dict], get, what: str):
    """EasyEdit takes a field for every request or for none."""
    values = [get(r) for r in requests]
    if all(values):
        return values
    if any(values):
        missing = [r["case_id"] for r, v in zip(requests, values) if not v][:5]
        raise ValueError(f"some requests have no {what} (case_ids {missing}...); EasyEdit needs it for all or none")
    return None


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


def batch_edit_inputs(requests: list[dict]) -> dict:
    """The arguments ``BaseEditor.batch_edit`` gets for ``requests``."""
    return dict(
        prompts=[r["prompt"] for r in requests], target_new=[r["target_new"] for r in requests],
        ground_truth=[r.get("ground_truth") or "<|endoftext|>" for r in requests],
        rephrase_prompts=_all_or_none(requests, lambda r: r.get("rephrase_prompt"), "rephrase_prompt"),
        locality_prompts=_all_or_none(requests, lambda r: _neighbour(r).get("prompt"), "locality prompt"),
        locality_ground_truth=_all_or_none(requests, lambda r: _neighbour(r).get("ground_truth"), "locality answer"),
        subject=[r["subject"] for r in requests])


def in_api_terms(api: str, inputs: dict) -> dict:
    """``batch_edit_inputs`` as keywords of the installed EasyEdit's ``batch_edit``, asking it to leave the edits on
    the model for megedit to score: the wheel keeps them with ``keep_original_weight=False``; the GitHub API ignores
    that keyword (and ``locality_prompts``/``locality_ground_truth``), restores the model after editing unless
    ``sequential_edit=True``, and takes locality as ``locality_inputs``."""
    if api == "wheel":
        return {**inputs, "keep_original_weight": False}
    from .easyedit.compat import locality_inputs

    rest = {k: v for k, v in inputs.items() if k not in ("locality_prompts", "locality_ground_truth")}
    locality = locality_inputs(inputs["locality_prompts"], inputs["locality_ground_truth"], len(inputs["prompts"]))
    return {**rest, "locality_inputs": locality, "sequential_edit": True}


def preflight(cfg: RunConfig, requests: list[dict]) -> None:
    """Checks that need each method's hparams and tokenizer, done for all methods before the first one edits: a
    problem with the last method must not surface after hours spent on the first."""
    from transformers import AutoTokenizer

    from .easyedit.compat import check_eval_lengths, locality_inputs
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
    if hp.alg_name in ("MEMIT", "AlphaEdit"):
        editor.apply_algo = _with_z_cache(editor.apply_algo, _z_cache_template(cfg, method, hp),
                                          {r["prompt"]: r["case_id"] for r in requests}, z_reused)
    reference = locality_reference(editor.model, editor.tok, requests)
    start = time.time()
    with PeakMemory() as memory, open(log_path, "w", buffering=1) as log, contextlib.redirect_stdout(log):
        metrics, edited, _ = editor.batch_edit(**in_api_terms(api, batch_edit_inputs(requests)), verbose=False)
        batch_seconds = time.time() - start
        ours = evaluate_requests(edited, editor.tok, requests, reference, progress=progress)
    editing_seconds = float(sum(dict.fromkeys(m["time"] for m in metrics)))  # one value per chunk
    meg_report = getattr(edited, "report", None)
    if (meg_report or {}).get("resumed"):  # this call did only part of the work: count every session's stage time
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
    if cfg.drop_conflicts:  # only when set: results written before the option existed keep their fingerprint
        inputs["drop_conflicts"] = True
    if cfg.split:
        inputs["split"] = cfg.split
    from .easyedit import register

    if register() == "github":  # the same way: results on the wheel keep theirs; a host's results are its own
        inputs["easyedit_api"] = "github"
    return hashlib.sha1(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_isolated(method: Method, requests: list[dict], cfg: RunConfig, log_path: Path, progress: bool = True) -> dict:
    """``run_method`` in a fresh process (``cfg.isolate``): its peak memory is its own, not the largest of every
    method run before it in this process, and nothing it loads or caches is seen by the next method."""
    if not cfg.isolate:
        return run_method(method, requests, cfg, log_path, progress)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_method, method, requests, cfg, log_path, progress).result()


def run(cfg: RunConfig, progress: bool = True) -> list[dict]:
    """Run every (method, size) not yet done, then write the combined tables and plot; returns all records."""
    from .records import write_json

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
    from .records import environment, write_json

    records = report.ordered([m.name for m in cfg.methods], records)
    rows = [report.result_row(r, cfg.metrics) for r in records]
    write_json(cfg.output / "results.json", {"config": str(cfg.path), "environment": environment(), "rows": rows,
                                             "kind_rows": report.kind_rows(records), "records": records})
    report.write_tables(cfg.output, cfg.name, rows, records)
    report.plot(rows, cfg.metrics, cfg.output / "results.png")
