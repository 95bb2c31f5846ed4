"""The config of ``megedit run`` (``megedit.runner``): read, checked, every error naming the key to fix.

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .knowedit import SPLITS
from .records import REPORTABLE
from .yaml_file import read_yaml_mapping

CONFIG_KEYS = {"name", "model", "device", "data", "sizes", "methods", "metrics", "output", "seed", "isolate", "z_cache",
               "share_z"}


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
