"""Covariance statistics for MEMIT and AlphaEdit, computed from local text and written where EasyEdit looks for them.

EasyEdit's MEMIT (and AlphaEdit's null-space projection) need, per edited layer, the uncentred second moment of the
inputs of the rewritten module (``rewrite_module_tmp``, e.g. ``mlp.down_proj``) over a text corpus. EasyEdit computes it
from Wikipedia, downloading it, unless this file exists::

    {stats_dir}/{model}/{mom2_dataset}_stats/{module}_{mom2_dtype}_mom2_{mom2_n_samples}.npz

holding ``mom2.mom2`` (d×d sum of x·xᵀ over tokens), ``mom2.count`` (tokens), ``mom2.constructor`` and
``sample_size`` (= ``mom2_n_samples``, else EasyEdit recomputes). ``{model}`` is ``config._name_or_path`` with "/"→"_"
in the registry wheel (rome/layer_stats.py:137) and its last "/" component in the GitHub version; both are written.

The text (documented default, ``DEFAULT_SOURCES``; never the edit or validation splits): one document per record of

- CounterFact's *train* split: the prompt, its rephrasing and its locality prompt, each completed with its *true*
  answer ("Toko Yasuda, the guitar. Toko Yasuda is incredible at guitar. John Lennon performs on the guitar.");
- UnKEBench: the question followed by its long free-text answer.

Files are read where they lie (a path, or relative to ``--data`` / ``$MEGEDIT_DATA``). Documents are shuffled with a
fixed seed and the first ``mom2_n_samples`` are used; each is tokenised like EasyEdit's ``TokenizedDataset``
(``tok.encode(text, truncation=True, max_length=<model context>)``).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import resolve_data_path
from .yaml_file import read_yaml_mapping

DEFAULT_SOURCES = ("counterfact/counterfact-train.json", "unke/UnKEBench-dev.json")
CONSTRUCTOR = "easyeditor.util.runningstats.SecondMoment()"
STATS_KEYS = ("model_name", "layers", "rewrite_module_tmp", "stats_dir", "mom2_dataset", "mom2_n_samples", "mom2_dtype")


def easyedit_stats_path(stats_dir, model_dir: str, ds_name: str, layer_name: str, precision: str,
                        sample_size: int | None, to_collect=("mom2",)) -> Path:
    """The file EasyEdit's ``layer_stats`` loads (rome/layer_stats.py:133-141), for the model folder ``model_dir``."""
    size_suffix = "" if sample_size is None else f"_{sample_size}"
    name = f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{size_suffix}.npz"
    return Path(stats_dir) / model_dir / f"{ds_name}_stats" / name


def model_dirs(name_or_path: str) -> list[str]:
    """The model folder names under ``stats_dir``: the wheel's ("/"→"_") and the GitHub version's (last component)."""
    return list(dict.fromkeys([name_or_path.replace("/", "_"), name_or_path.rsplit("/")[-1]]))


def stats_paths(model, hp: dict, layer: int) -> list[Path]:
    layer_name = hp["rewrite_module_tmp"].format(layer)
    return [easyedit_stats_path(hp["stats_dir"], d, hp["mom2_dataset"], layer_name, hp["mom2_dtype"],
                                hp["mom2_n_samples"]) for d in model_dirs(model.config._name_or_path)]


def is_valid(path: Path, sample_size: int) -> bool:
    if not path.exists():
        return False
    with np.load(path) as f:
        return {"mom2.mom2", "mom2.count", "sample_size"} <= set(f.files) and int(f["sample_size"]) == sample_size


# ------------------------------------------------------------------------------------------------------- text
def _counterfact_document(r: dict) -> str:
    answer = r["ground_truth"]
    parts = [r["prompt"], r.get("rephrase_prompt")]
    sentences = [f"{p} {answer}." for p in parts if p]
    if r.get("locality_prompt") and r.get("locality_ground_truth"):
        sentences.append(f"{r['locality_prompt']} {r['locality_ground_truth']}.")
    return " ".join(sentences)


def _documents_of(records: list[dict], path: Path) -> list[str]:
    first = records[0]
    if "question" in first and "answer" in first:  # UnKEBench
        return [f"{r['question']} {r['answer']}" for r in records]
    if "prompt" in first and "ground_truth" in first:  # EasyEdit CounterFact
        return [_counterfact_document(r) for r in records]
    if "requested_rewrite" in first:  # ROME CounterFact
        rewrites = [r["requested_rewrite"] for r in records]
        return [_counterfact_document({"prompt": rw["prompt"].format(rw["subject"]),
                                       "ground_truth": rw["target_true"]["str"]}) for rw in rewrites]
    raise ValueError(f"{path}: cannot make text documents from records with keys {sorted(first)}; use CounterFact "
                     "(EasyEdit or ROME format) or UnKEBench files")


def text_documents(sources=DEFAULT_SOURCES, data_dir: str | None = None, seed: int = 0) -> list[str]:
    """Every document of ``sources`` (paths, or relative to ``data_dir`` / $MEGEDIT_DATA), shuffled with ``seed``."""
    docs: list[str] = []
    for source in sources:
        path = Path(data_dir) / source if data_dir and not Path(source).is_absolute() else source
        path = resolve_data_path(path)
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not records:
            raise ValueError(f"{path} must hold a non-empty JSON list of records")
        docs += [d for d in _documents_of(records, path) if d.strip()]
    random.Random(seed).shuffle(docs)
    return docs


# ------------------------------------------------------------------------------------------------- statistics
class _Done(Exception):
    """Raised after the last hooked module of a batch: the layers above it are not needed."""


def _context_length(config) -> int:
    for key in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"cannot tell the context length of model_type={config.model_type!r}")


def _batches(token_lists: list[list[int]], batch_tokens: int):
    """Indices grouped into padded batches of at most ``batch_tokens`` tokens (longest first, like length_collation)."""
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    batch: list[int] = []
    for i in order:
        if batch and len(token_lists[batch[0]]) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def second_moments(model, tok, module_names: list[str], documents: list[str], batch_tokens: int = 4096,
                   progress: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
    """``{module: (Σ x·xᵀ in float64, token count)}`` over the inputs of each module, padding excluded."""
    modules = dict(model.named_modules())
    missing = [m for m in module_names if m not in modules]
    if missing:
        raise ValueError(f"modules {missing} do not exist in {type(model).__name__}; check rewrite_module_tmp")
    device = next(model.parameters()).device
    maxlen = _context_length(model.config)
    token_lists = [tok.encode(d, truncation=True, max_length=maxlen) for d in documents]
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(module_names, 0)
    state = {"mask": None, "seen": set()}

    def hook_for(name):
        def hook(module, args):
            x = args[0][state["mask"]].float()  # (tokens, d)
            part = (x.T @ x).double()  # one batch in float32 (fast), the running sum in float64 (exact enough)
            sums[name] = sums[name] + part if name in sums else part
            counts[name] += x.shape[0]
            state["seen"].add(name)
            if len(state["seen"]) == len(module_names):
                raise _Done

        return hook

    handles = [modules[m].register_forward_pre_hook(hook_for(m)) for m in module_names]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        bar = tqdm(total=len(documents), desc="covariance", unit="doc", disable=not progress)
        for batch in _batches(token_lists, batch_tokens):
            width = max(len(token_lists[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, i in enumerate(batch):
                ids[row, : len(token_lists[i])] = torch.tensor(token_lists[i])
                mask[row, : len(token_lists[i])] = True
            state["mask"], state["seen"] = mask.to(device), set()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
            except _Done:
                pass
            bar.update(len(batch))
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return {m: (sums[m].cpu(), counts[m]) for m in module_names}


def write_stats(paths: list[Path], mom2_sum: torch.Tensor, count: int, sample_size: int, dtype: str) -> None:
    """Write one npz in EasyEdit's layout to ``paths[0]`` (atomically) and link or copy it to the other paths."""
    first = paths[0]
    first.parent.mkdir(parents=True, exist_ok=True)
    tmp = first.with_name(f".{first.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{"mom2.mom2": mom2_sum.numpy().astype(dtype), "mom2.count": np.int64(count),
                       "mom2.constructor": CONSTRUCTOR, "sample_size": np.int64(sample_size)})
    os.replace(tmp, first)
    for other in paths[1:]:
        other.parent.mkdir(parents=True, exist_ok=True)
        other.unlink(missing_ok=True)
        try:
            os.link(first, other)
        except OSError:
            shutil.copyfile(first, other)


def read_covariance(path: Path) -> torch.Tensor:
    """The covariance EasyEdit's ``get_cov`` makes of a file ``write_stats`` wrote: the second moment over the token
    count (float64)."""
    with np.load(path) as f:
        return torch.from_numpy(f["mom2.mom2"]).double() / float(f["mom2.count"])


def read_stats_hparams(path: str | Path) -> dict:
    """The keys ``megedit stats`` needs from a MEMIT/AlphaEdit hparams YAML, checked."""
    p = Path(path)
    config = read_yaml_mapping(p, "hparams file")
    missing = [k for k in STATS_KEYS if k not in config]
    if missing:
        raise ValueError(f"{p} has no {missing}: covariance statistics are for MEMIT/AlphaEdit-style hparams files")
    if not isinstance(config["mom2_n_samples"], int) or config["mom2_n_samples"] <= 0:
        raise ValueError(f"{p}: mom2_n_samples must be a positive integer, got {config['mom2_n_samples']!r}")
    if config["mom2_dtype"] not in ("float16", "float32", "float64"):
        raise ValueError(f"{p}: mom2_dtype must be float16, float32 or float64, got {config['mom2_dtype']!r}")
    return config


def precompute_stats(hparams_path, layers: list[int] | None = None, sources=DEFAULT_SOURCES,
                     data_dir: str | None = None, device: str | None = None, force: bool = False,
                     batch_tokens: int = 4096, seed: int = 0, progress: bool = True) -> list[Path]:
    """Write the statistics an hparams file needs (``layers`` overrides its layer list); returns every file written.

    Layers whose files already hold ``mom2_n_samples`` samples are skipped unless ``force``.
    """
    from .easyedit.loader import load_model_named, normalise_device

    hp = read_stats_hparams(hparams_path)
    layers = list(layers if layers is not None else hp["layers"])
    model, tok = load_model_named(hp["model_name"], device=normalise_device(device or hp.get("device")))
    todo = [layer for layer in layers
            if force or not all(is_valid(p, hp["mom2_n_samples"]) for p in stats_paths(model, hp, layer))]
    if not todo:
        return []
    documents = text_documents(sources, data_dir, seed)
    n = hp["mom2_n_samples"]
    if n > len(documents):
        raise ValueError(f"mom2_n_samples={n} but the text sources hold only {len(documents)} documents; lower "
                         "mom2_n_samples or add sources")
    names = [hp["rewrite_module_tmp"].format(layer) for layer in todo]
    moments = second_moments(model, tok, names, documents[:n], batch_tokens, progress)
    written = []
    for layer, name in zip(todo, names):
        paths = stats_paths(model, hp, layer)
        write_stats(paths, *moments[name], sample_size=n, dtype=hp["mom2_dtype"])
        written += paths
    return written
