"""Checkpoints of one training run, so that an interrupted run resumes where it stopped.

A run's folder is ``<checkpoint_dir>/<run key>``; the key hashes everything that determines the result (the requests,
the hparams, the pseudo-edit file, the base model's fingerprint, megedit's version), so a resume never mixes two runs.
Inside, every file is written atomically:

    run.json                        what the key was computed from, for people
    stage1.json, stage1_encoder/    the tuned encoder, its report and the RNG state after it
    stage2.json, stage2.safetensors the familiarity gate, its report and the RNG state after it
    neurons/from_000000.safetensors one file per chunk of ``fit_batch_edits`` fitted neurons
    generator.pt                    the generator's training state, every ``checkpoint_gen_epochs`` epochs and at the end
    seconds.json                    time spent on each stage's saved work, so a run resumed over several sessions
                                    reports what its kept work cost (work lost after the last save is not counted)

With ``checkpoint_dir: null`` the checkpoint is disabled: ``has`` is always False and saving does nothing.
Under data parallelism every rank reads the folder (it must be on a filesystem they all see) and rank 0 alone writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, atomic_write

log = logging.getLogger(__name__)

# where and how often to save, where the weights sit, and what only EasyEdit's own code reads (its chunk size, its
# evaluation's cut-off) do not change the result
NOT_IN_KEY = ("checkpoint_dir", "checkpoint_gen_epochs", "device_map", "batch_size", "max_length")


def _what_training_reads(request: dict) -> dict:
    """The request fields training reads; the rest (case_id, portability answers, ...) depends on who built the dict:
    ``megedit run`` hands EasyEdit-built requests, ``megedit edit`` its own, and both must find the same checkpoint."""
    from .augment import evaluation_texts

    return {"prompt": request["prompt"], "target_new": request["target_new"], "subject": request.get("subject"),
            "ground_truth": request.get("ground_truth"), "never_train_on": sorted(evaluation_texts(request))}


def run_key(requests: list[dict], hp, base_fingerprint: dict) -> tuple[str, dict]:
    """A short hash of what determines the run, and the description it hashes."""
    from . import __version__
    from .data import resolve_data_path

    pool = None
    if hp.pseudo_edit_data:
        pool = hashlib.sha256(resolve_data_path(hp.pseudo_edit_data).read_bytes()).hexdigest()
    described = {"megedit_version": __version__, "base_model": base_fingerprint, "pseudo_edit_data_sha256": pool,
                 "hparams": {k: v for k, v in hp.to_dict().items() if k not in NOT_IN_KEY},
                 "requests": [_what_training_reads(r) for r in requests]}
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], described


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RunCheckpoint:
    """The checkpoint folder of one run (``root`` None: disabled; ``writer`` False: read-only, as on ranks > 0)."""

    def __init__(self, root: Path | None, writer: bool = True):
        self.root = root
        self.writer = writer
        self._spent = self.load_json("seconds.json") if self.has("seconds.json") else {}  # stage -> saved seconds
        self.resumed = bool(self._spent)
        self._stage: tuple[str, float] | None = None  # (stage being timed, its start in this process)

    # -------------------------------------------------------------------------------------- time per stage
    def begin(self, stage: str) -> None:
        """Start timing ``stage``; its seconds continue from what earlier processes saved for it."""
        self._stage = (stage, time.time() - self._spent.get(stage, 0.0))

    def seconds(self) -> float:
        """Seconds of the stage being timed, earlier processes' saved work included."""
        return time.time() - self._stage[1]

    def _saved(self) -> None:
        if self._stage is not None and self.root is not None and self.writer:
            self._spent[self._stage[0]] = self.seconds()
            spent = dict(self._spent)
            atomic_write(self.path("seconds.json"), lambda tmp: tmp.write_text(json.dumps(spent, indent=2)))

    @classmethod
    def for_run(cls, requests: list[dict], hp, base_fingerprint: dict) -> "RunCheckpoint":
        from .distributed import is_main

        if hp.checkpoint_dir is None:
            return cls(None)
        key, described = run_key(requests, hp, base_fingerprint)
        ckpt = cls(Path(hp.checkpoint_dir).expanduser() / key, writer=is_main())
        if ckpt.has("run.json"):
            if ckpt.writer:  # ranks > 0 may see the run.json rank 0 has just written
                log.warning("resuming from checkpoint %s", ckpt.root)
        else:
            ckpt.save_json("run.json", described)
        return ckpt

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return self.root is not None and self.path(name).exists()

    def save_json(self, name: str, obj) -> None:
        if self.root is not None and self.writer:
            atomic_write(self.path(name), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))
            self._saved()

    def load_json(self, name: str):
        return json.loads(self.path(name).read_text())

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.root is not None and self.writer:
            plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
            atomic_write(self.path(name), lambda tmp: save_file(plain, str(tmp)))
            self._saved()

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(name)))

    def save_state(self, name: str, state: dict) -> None:
        """Training state (optimiser, scheduler, RNG): nested dicts of tensors and numbers."""
        if self.root is not None and self.writer:
            atomic_write(self.path(name), lambda tmp: torch.save(state, tmp))
            self._saved()

    def load_state(self, name: str) -> dict:
        return torch.load(self.path(name), weights_only=True)

    def save_encoder(self, name: str, encoder) -> None:
        if self.root is not None and self.writer:
            atomic_dir(self.path(name), lambda tmp: encoder.save(str(tmp), create_model_card=False), replace=True)
            self._saved()

    def load_encoder(self, name: str, device: str):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.path(name)), device=device)
