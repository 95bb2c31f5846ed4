"""A MeG edit on disk, apart from its base model (like a PEFT adapter).

Layout of the folder::

    megedit_edit.json        manifest: megedit version, neuron layer, shapes, base-model fingerprint, sha256 of each file
    hparams.yaml             the MeGHyperParams the edit was trained with
    encoder/                 the tuned sentence-transformers model, whole (it is small)
    familiarity.safetensors  the gate, with its thresholds epsilon and tau and its keys
    generator.safetensors    the weight generator, with its normalisation and start noise
    relation.safetensors     the relation check's masked keys, their edits and its threshold, with relation.json
                             (subjects, top_k); optional: only an edit trained with relation_check has it
    edits.json               what was edited (case_id, prompt, subject, target_new) and the edit of each gate key, for
                             ``megedit ask`` (optional: edits saved before it existed load without it)

The folder is built under a temporary name and renamed into place, and the manifest is written last, so an interrupted
save never leaves a folder that loads. Loading checks every file's hash, and refuses a base model whose fingerprint
(architecture, sizes, dtype, hash of the embedding and of the edited layer's MLP weights) differs from the one the
edit was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .arch import check_base_model
from .atomic import atomic_dir, recover_leftovers

MANIFEST = "megedit_edit.json"
EDITS = "edits.json"
FORMAT = 2  # 2: the manifest carries manifest_sha256, a hash of all its other fields
READABLE_FORMATS = (1, FORMAT)
MANIFEST_KEYS = ("format", "layer", "familiarity", "generator", "base_model", "files")


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _manifest_digest(manifest: dict) -> str:
    """sha256 of every manifest field but the digest itself: a field changed by hand is found, not trusted."""
    fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _plain(state: dict) -> dict:
    """safetensors wants contiguous CPU tensors that share no memory."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _check_finite(edit) -> None:
    for part in ("familiarity", "generator"):
        for name, t in getattr(edit, part).state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
                raise ValueError(f"refusing to save a broken edit: {part}.{name} contains NaN/inf")


def check_save_target(directory: str | os.PathLike) -> None:
    """Saving replaces the folder: allow only a new or empty folder, or an earlier saved edit."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir())
                                                          and not (directory / MANIFEST).exists())):
        raise ValueError(f"{directory} exists and is not a saved megedit edit; choose a new or empty folder")


def save_edit(edit, directory: str | os.PathLike, fingerprint: dict) -> Path:
    from . import __version__

    directory = Path(directory)
    check_save_target(directory)
    _check_finite(edit)
    fam = edit.familiarity

    def fill(tmp: Path) -> None:
        edit.encoder.save(str(tmp / "encoder"), create_model_card=False)
        save_file(_plain(fam.state_dict()), str(tmp / "familiarity.safetensors"))
        save_file(_plain(edit.generator.state_dict()), str(tmp / "generator.safetensors"))
        (tmp / "hparams.yaml").write_text(yaml.safe_dump(edit.hparams.to_dict(), sort_keys=False))
        if edit.edits is not None:
            (tmp / EDITS).write_text(json.dumps({"edits": edit.edits, "key_edit": edit.key_edit}, default=str))
        if getattr(edit, "relation", None) is not None:
            from .relation import save_relation

            save_relation(edit.relation, tmp)
        manifest = {
            "format": FORMAT, "megedit_version": __version__, "layer": edit.layer,
            "familiarity": {"dim": fam.keys.shape[1], "hidden": fam.blocks[0].ff[0].out_features if len(fam.blocks) else 1,
                            "blocks": len(fam.blocks), "classes": fam.head[1].out_features, "n_keys": fam.keys.shape[0]},
            "generator": {"vector_size": edit.generator.vector_size, "cond_dim": edit.generator.cond_dim},
            "base_model": fingerprint, "files": _file_hashes(tmp),
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence means "complete"

    return atomic_dir(directory, fill, replace=True)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of the edit saved in ``directory``, once every field and every file is checked."""
    directory = Path(directory)
    recover_leftovers(directory)  # a save killed while replacing this folder, or killed saves' temporary folders
    if not (directory / MANIFEST).is_file():
        why = "does not exist" if not directory.exists() else f"has no {MANIFEST} (not a saved edit, or an unfinished save)"
        raise ValueError(f"cannot load a megedit edit from {directory}: the folder {why}")
    damaged = f"the saved edit in {directory} is damaged: {MANIFEST}"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{damaged} is not valid JSON ({e}); save the edit again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{damaged} is not a JSON object; save the edit again")
    if manifest.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{directory} holds edit format {manifest.get('format')!r}; this megedit reads formats "
                         f"{list(READABLE_FORMATS)}")
    missing = [k for k in MANIFEST_KEYS + (("manifest_sha256",) if manifest["format"] >= 2 else ()) if k not in manifest]
    if missing:
        raise ValueError(f"{damaged} lacks {', '.join(missing)}; save the edit again")
    if manifest["format"] >= 2 and manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise ValueError(f"{damaged} was changed after the edit was saved (its fields no longer match "
                         "manifest_sha256); save the edit again")
    found = _file_hashes(directory)
    for name, digest in manifest["files"].items():
        if found.get(name) != digest:
            state = "is missing" if name not in found else "does not match its hash"
            raise ValueError(f"{directory}: {name} {state}: the saved edit is damaged; save it again")
    # the parts agree on the layer (a format-1 manifest has no digest of its own)
    layers = {"layer": manifest["layer"], "base_model.layer": (manifest["base_model"] or {}).get("layer"),
              "hparams.yaml's layer": (yaml.safe_load((directory / "hparams.yaml").read_text()) or {}).get("layer")}
    if len(set(map(repr, layers.values()))) != 1:
        raise ValueError(f"{damaged}: its parts disagree on the edited layer ({layers}); save the edit again")
    return manifest


def load_edit_parts(directory: str | os.PathLike, base_model=None, device: str | None = None,
                    strict: bool = True) -> dict:
    """The parts of the edit saved in ``directory``, as ``MeGEdit``'s keyword arguments (``MeGEdit.from_pretrained``
    builds it); with ``base_model``, refuse it unless it was trained on that model."""
    from sentence_transformers import SentenceTransformer

    from .familiarity import FamiliarityNet
    from .generator import NeuronGenerator
    from .hparams import MeGHyperParams

    directory = Path(directory)
    manifest = read_manifest(directory)
    if base_model is not None:
        check_base_model(manifest["base_model"], base_model, str(directory), strict)
        device = device or str(next(base_model.parameters()).device)
    hp = MeGHyperParams.from_dict(yaml.safe_load((directory / "hparams.yaml").read_text()),
                                  source=str(directory / "hparams.yaml"))
    device = device or "cpu"
    encoder = SentenceTransformer(str(directory / "encoder"), device=device)
    try:
        familiarity = FamiliarityNet(**manifest["familiarity"])
        familiarity.load_state_dict(load_file(str(directory / "familiarity.safetensors")))
        generator = NeuronGenerator(manifest["generator"]["vector_size"], manifest["generator"]["cond_dim"], hp)
        generator.load_state_dict(load_file(str(directory / "generator.safetensors")))
    except (RuntimeError, TypeError, KeyError) as e:  # the manifest's sizes and the saved weights disagree
        raise ValueError(f"{directory}: the manifest's sizes do not fit the saved weights "
                         f"({str(e).splitlines()[0]}); the saved edit is damaged; save it again") from None
    for module in (encoder, familiarity, generator):
        module.to(device).eval().requires_grad_(False)
    edits = json.loads((directory / EDITS).read_text()) if EDITS in manifest["files"] else {}
    from .relation import RELATION_FILES, load_relation

    relation = load_relation(directory, device) if RELATION_FILES[0] in manifest["files"] else None
    return dict(encoder=encoder, familiarity=familiarity, generator=generator, layer=manifest["layer"], hparams=hp,
                base_fingerprint=manifest["base_model"], edits=edits.get("edits"), key_edit=edits.get("key_edit"),
                relation=relation)
