"""Kept results: a small, committed record of one run that backs every published figure.

``megedit edit ... --keep bench/results/<run>`` and ``megedit run ... --keep bench/results/<run>`` write
``results.json`` (what the tables read) and ``results.md`` (the same for people) there: the metrics per method and
size, per-kind rates (the gate's familiar rate per query kind), the configuration, the exact command, the git commit,
the machine (CPU model and the flags that change speed), package versions, the seed and the seconds per stage. Never
weights. ``bench/tables.py`` rebuilds the READMEs' tables from these files.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .records import REPORTABLE, write_json

FORMAT = 1
PACKAGES = ("torch", "transformers", "sentence-transformers", "diffusers", "accelerate", "safetensors", "numpy",
            "easyeditor", "megedit")
# CPU flags that change how fast (or in which precision) the training stages run
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
TITLES = {"rel_tf": "Rel TF", "rel_ag": "Rel AG", "gen_tf": "Gen TF", "gen_ag": "Gen AG", "loc_tf": "Loc TF",
          "loc_ag": "Loc AG", "score": "Score"}


def check_keep_target(folder: str | os.PathLike) -> Path:
    """Refuse, before any work, a folder that already holds a kept result: a kept figure is never overwritten."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--keep {folder}: exists and is not a folder")
    if (path / "results.json").exists():
        raise ValueError(f"--keep {folder}: already holds a kept result; choose a new folder (bench/results/<run>)")
    return path


def git_state() -> dict:
    """The commit of the megedit checkout that ran, and whether it had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    """CPU model, core count and speed-relevant flags; the GPU's name when one is in use."""
    info = {}
    try:  # Linux; elsewhere the model is what platform knows and the flags are unknown
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    out = {"cpu": model, "cpus": os.cpu_count(), "cpu_flags": [f for f in CPU_FLAGS if f in flags],
           "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}
    import torch

    out["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(command: str | None = None, git: dict | None = None) -> dict:
    """Everything about how a result was made that is not the result itself. ``git``: the checkout's state when the
    command started (taken again now if not given; a commit made while a long run ran is not the code that ran)."""
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return {"command": command, "git": git or git_state(), "machine": machine(),
            "packages": package_versions(), "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def keep(folder: str | os.PathLike, name: str, rows: list[dict], seed: int, config: dict, per_kind: dict,
         seconds: dict, extra: dict | None = None, command: str | None = None, git: dict | None = None) -> Path:
    """Write ``results.json`` and ``results.md`` to ``folder``.

    ``rows``: one per (method, size): {"method", "n", "data", metrics in %, "edit_s", optional "peak_gb"}.
    ``per_kind``: per method, rates by query kind; ``seconds``: per method, seconds by stage; ``config``: per
    method, its hparams and overrides."""

    path = check_keep_target(folder)
    record = {"kept_format": FORMAT, "name": name, **provenance(command, git), "seed": seed, "rows": rows, "per_kind": per_kind,
              "seconds": seconds, "config": config, **(extra or {})}
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "results.json", record)
    (path / "results.md").write_text(markdown(record))
    return path


def metrics_table(rows: list[dict]) -> str:
    """Markdown table of metrics; a row's "link" (a results.md path) goes in a last column when any row has one."""
    linked = any(r.get("link") for r in rows)
    head = "| method | n | data | " + " | ".join(TITLES[m] for m in REPORTABLE) + " | edit (s) |" + \
        (" kept result |" if linked else "")
    lines = [head, "|---|---:|---|" + "---:|" * (len(REPORTABLE) + 1) + ("---|" if linked else "")]
    for r in rows:
        cells = [f"{r[m]:.1f}" if isinstance(r.get(m), (int, float)) else "–" for m in REPORTABLE]
        edit_s = f"{r['edit_s']:.0f}" if isinstance(r.get("edit_s"), (int, float)) else "–"
        link = f" [{r['link']}]({r['link']}) |" if r.get("link") else (" |" if linked else "")
        lines.append(f"| {r['method']} | {r['n']} | {r.get('data', '')} | " + " | ".join(cells) + f" | {edit_s} |" +
                     link)
    return "\n".join(lines)


def markdown(record: dict) -> str:
    git = record["git"]
    commit = f"{git['commit']}{' (with uncommitted changes)' if git['dirty'] else ''}" if git["commit"] else "unknown"
    m = record["machine"]
    lines = [f"# {record['name']}", "", metrics_table(record["rows"]), "",
             "Rel/Gen/Loc in %, after the edit: TF teacher-forced (a MeG model routed on the prompt alone), AG greedy "
             "generation, Loc against the unedited model; Score = harmonic mean of the six.", "",
             f"- command: `{record['command']}`", f"- commit: `{commit}`", f"- seed: {record['seed']}",
             f"- machine: {m['cpu']}, {m['cpus']} CPUs ({', '.join(m['cpu_flags']) or 'no AVX2/AVX-512/AMX'}), "
             f"{m['system']}, Python {m['python']}, torch threads {m['torch_threads']}" +
             (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             "- packages: " + ", ".join(f"{k} {v}" for k, v in record["packages"].items() if v),
             f"- written: {record['time']}"]
    for r in record["rows"]:
        if r.get("easyedit"):  # EasyEdit's compute_edit_quality on the same edited model (MeG routed on prompt + answer)
            lines.append(f"- EasyEdit's own numbers, {r['method']} n={r['n']}: " +
                         ", ".join(f"{k} {v:.1f}" for k, v in r["easyedit"].items() if isinstance(v, (int, float))))
    if record.get("easyedit_source"):
        lines.append(f"- EasyEdit imported from: `{record['easyedit_source']}`")
    for r in record["rows"]:
        if r.get("easyedit_api"):
            lines.append(f"- {r['method']} n={r['n']}: EasyEdit API {r['easyedit_api']}, update by "
                         f"`{r.get('implementation')}`")
    for r in record["rows"]:  # what the edit time leaves out
        if r.get("z_reused"):
            lines.append(f"- {r['method']} n={r['n']}: {r['z_reused']} of its target vectors z were read from the z "
                         "cache, so its edit time excludes computing them")
        if r.get("resumed"):
            lines.append(f"- {r['method']} n={r['n']}: its stages were read from checkpoints of an earlier run with "
                         "the same key; its stage seconds and edit time are that run's")
    for method, seconds in record["seconds"].items():
        lines.append(f"- seconds, {method}: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    for method, rates in record["per_kind"].items():
        if rates:
            lines.append(f"- per kind, {method}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()))
    lines += ["", "Configuration (hparams as run, per method):", "", "```json",
              json.dumps(record["config"], indent=1, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)
