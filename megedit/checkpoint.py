"""Checkpoints of one training run, so that an interrupted run resumes where it stopped.

A run's folder is ``<checkpoint_dir>/<run key>``; the key hashes what every stage reads (the requests, the shared
hparams, the pseudo-edit file, the base model's fingerprint, megedit's version). Each stage keeps its work in a
subfolder ``<stage>-<stage key>`` whose key adds that stage's own hparams (``encoder_*``, ``familiarity_*``,
``fit_*``, ``generator``/``dit_*``/``gen_*``) to the keys of the stages it reads: a run that changes only the
generator's settings reuses the tuned encoder, the gate and the fitted neurons, and never mixes in another run's work.
Inside, every file is written atomically:

    run.json                                    what the run key was computed from, for people
    seconds.json                                time spent on each stage folder's saved work, so a run resumed over
                                                several sessions reports what its kept work cost
    stage1_encoder-<key>/stage1.json, stage1_encoder/, stage1_rng.safetensors   the tuned encoder, report, RNG after it
    embed-<key>/embeddings.safetensors                                          every training text's embedding
    stage2_familiarity-<key>/familiarity.pt     the gate's training state after each epoch
    stage2_familiarity-<key>/stage2.json, stage2.safetensors                    the familiarity gate and its report
    stage3_neurons-<key>/neurons/from_000000.safetensors                        one file per ``fit_batch_edits`` fits
    stage4_generator-<key>/generator.pt         the generator's training state, every ``checkpoint_gen_epochs``
                                                epochs and at the end
    <stage>-<key>/hparams.json                  the stage's own hparams, for people
    <stage>-<key>/hashes.json                   sha256 of every file (or folder) above, recorded as it is written

Resuming verifies each stage's files against ``hashes.json`` when the stage opens: a damaged or unrecorded file is
never read. Stage 3's chunks stand alone, so only a damaged chunk is refitted; in any other stage one damaged file
means the whole stage is recomputed. Either way a warning names the stage and the file.

With ``checkpoint_dir: null`` the checkpoint is disabled: ``has`` is always False and saving does nothing.
Under data parallelism every rank reads the folder (it must be on a filesystem they all see) and rank 0 alone writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, atomic_write

log = logging.getLogger(__name__)

# where and how often to save, where the weights sit, how the generator samples once trained, the divergence check
# (it stops training or changes nothing), and what only EasyEdit's own code reads (its chunk size, its evaluation's
# cut-off) do not change what is saved
NOT_IN_KEY = ("checkpoint_dir", "checkpoint_gen_epochs", "device_map", "batch_size", "max_length", "sample_scheduler",
              "sample_steps", "gen_diverge_ratio")
# each stage's own hparams (by name prefix), and the stages whose saved work it reads. Stage 3 reads neither the
# encoder nor the gate, nor any RNG state they leave (its start is seeded): the gate's settings do not refit neurons.
STAGES = {"stage1_encoder": (("encoder_",), ()),
          "embed": ((), ("stage1_encoder",)),  # every training text through the tuned encoder
          "stage2_familiarity": (("familiarity_",), ("stage1_encoder",)),
          "stage3_neurons": (("fit_",), ()),
          "stage4_generator": (("generator", "dit_", "gen_"), ("stage1_encoder", "stage3_neurons"))}


# fields added after checkpoints were first written, each with the value that trains exactly as before: left out of
# the keys while they hold it, so a run resumed by a newer megedit finds the stages it already trained
ADDED_FIELDS = {"fit_init": "random", "gen_epoch_unit": "views", "gen_stop_patience": 0, "gen_stop_min_delta": 0.0,
                "familiarity_curve": False, "familiarity_patience": 0, "familiarity_min_delta": 0.0}

HASHES = "hashes.json"
# stages whose files are independent pieces of work: a damaged one is redone alone, the others are kept
INDEPENDENT_FILES = ("stage3_neurons",)


def _digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (their relative names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def key_hash(obj) -> str:
    """The hash of run and stage keys (also bench/cost.py's settings groups)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _what_training_reads(request: dict) -> dict:
    """The request fields training reads; the rest (case_id, portability answers, ...) depends on who built the dict:
    ``megedit run`` hands EasyEdit-built requests, ``megedit edit`` its own, and both must find the same checkpoint."""
    from .augment import evaluation_texts

    return {"prompt": request["prompt"], "target_new": request["target_new"], "subject": request.get("subject"),
            "ground_truth": request.get("ground_truth"), "never_train_on": sorted(evaluation_texts(request))}


def run_keys(requests: list[dict], hp, base_fingerprint: dict) -> tuple[str, dict[str, str], dict]:
    """The run key, each stage's key, and the description they hash."""
    from . import __version__
    from .data import resolve_data_path

    pool = None
    if hp.pseudo_edit_data:
        pool = hashlib.sha256(resolve_data_path(hp.pseudo_edit_data).read_bytes()).hexdigest()
    # the relation check is built after the last stage from their outputs, never checkpointed: its settings key nothing
    shared = {k: v for k, v in hp.to_dict().items() if k not in NOT_IN_KEY and not k.startswith("relation_")
              and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}
    own = {stage: {k: shared[k] for k in shared if k.startswith(prefixes)} for stage, (prefixes, _) in STAGES.items()}
    for params in own.values():
        for k in params:
            del shared[k]
    from .leakage import RULES as training_text_rules

    described = {"megedit_version": __version__, "base_model": base_fingerprint, "pseudo_edit_data_sha256": pool,
                 "training_text_rules": training_text_rules, "hparams": shared, "requests": [_what_training_reads(r) for r in requests]}
    run = key_hash(described)
    stages: dict[str, str] = {}
    for stage, (_, reads) in STAGES.items():
        stages[stage] = key_hash([run, [stages[r] for r in reads], own[stage]])
    return run, stages, {**described, "stage_hparams": own}


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
    """The checkpoint folder of one run (``root`` None: disabled; ``writer`` False: read-only, as on ranks > 0).

    ``begin(stage)`` opens a stage: until the next ``begin``, file names are inside that stage's folder.
    """

    def __init__(self, root: Path | None, stage_keys: dict[str, str] | None = None, writer: bool = True,
                 stage_hparams: dict[str, dict] | None = None):
        self.root = root
        self.writer = writer
        self.folders = {stage: f"{stage}-{key}" for stage, key in (stage_keys or {}).items()}
        self._stage_hparams = stage_hparams or {}
        self._spent = self._read_seconds()  # folder -> seconds
        self.resumed = any(folder in self._spent for folder in self.folders.values())
        self._stage: tuple[str, float] | None = None  # (stage being timed, its start in this process)
        self._hashes: dict[str, dict[str, str]] = {}  # stage -> {name: sha256} of its verified, readable files
        self.damaged: dict[str, list[str]] = {}  # stage -> the files found damaged (and not read) in this process

    def _read_seconds(self) -> dict:
        seconds = None if self.root is None else self.root / "seconds.json"
        if not seconds or not seconds.exists():
            return {}
        try:
            return json.loads(seconds.read_text())
        except ValueError:  # timing is for people: a damaged record costs the report, not the run
            log.warning("checkpoint %s: seconds.json is damaged; earlier sessions' stage times are not counted", seconds)
            return {}

    # -------------------------------------------------------------------------------------- integrity
    def _verify(self, stage: str) -> None:
        """Keep only the stage's files whose hash matches the one recorded when they were written."""
        folder = self.root / self.folders[stage]
        try:
            recorded = json.loads((folder / HASHES).read_text()) if (folder / HASHES).exists() else {}
        except ValueError:
            recorded = None  # the record itself is damaged: nothing in the folder can be vouched for
        written = [p.name for p in folder.iterdir() if p.name not in (HASHES, "hparams.json")] \
            if folder.is_dir() else []
        if recorded is None:
            bad = [HASHES]
        else:
            bad = [name for name, digest in recorded.items()
                   if (folder / name).exists() and _digest(folder / name) != digest]
        good = {} if recorded is None else {n: d for n, d in recorded.items() if n not in bad and (folder / n).exists()}
        if bad:
            whole = stage not in INDEPENDENT_FILES or recorded is None
            log.warning("checkpoint stage %s (%s) is damaged: %s %s not match the hash recorded when written; "
                        "recomputing %s", stage, folder, ", ".join(bad), "does" if len(bad) == 1 else "do",
                        "the stage" if whole else "those parts, keeping the rest")
            self.damaged[stage] = bad
            if whole:
                good = {}
            if self.writer:
                if whole:
                    shutil.rmtree(folder, ignore_errors=True)
                    self._spent.pop(self.folders[stage], None)
                else:
                    for name in bad:
                        (folder / name).unlink(missing_ok=True)
                    self._record(stage, good)
        elif written and not recorded:
            log.warning("checkpoint stage %s (%s) has no record of its files' hashes (an older megedit wrote it): "
                        "recomputing the stage", stage, folder)
        self._hashes[stage] = good

    def _record(self, stage: str, hashes: dict[str, str]) -> None:
        folder = self.root / self.folders[stage]
        atomic_write(folder / HASHES, lambda tmp: tmp.write_text(json.dumps(hashes, indent=2, sort_keys=True)))

    def _written(self, name: str) -> None:
        """``name`` (in the open stage) is complete: record its hash, then count the stage's time."""
        stage = self._stage[0]
        self._hashes[stage][name] = _digest(self.path(name))
        self._record(stage, self._hashes[stage])
        self._saved()

    # -------------------------------------------------------------------------------------- time per stage
    def begin(self, stage: str) -> None:
        """Open ``stage``; its seconds continue from what earlier processes saved for its folder."""
        if self.root is not None and stage not in self.folders:
            raise ValueError(f"unknown stage {stage!r}; known: {sorted(self.folders)}")
        if self.root is not None and stage not in self._hashes:
            self._verify(stage)
        self._stage = (stage, time.time() - self._spent.get(self.folders.get(stage), 0.0))

    def seconds(self) -> float:
        """Seconds of the stage being timed, earlier processes' saved work included."""
        return time.time() - self._stage[1]

    def _saved(self) -> None:
        if self._stage is not None and self.root is not None and self.writer:
            self._spent[self.folders[self._stage[0]]] = self.seconds()
            spent = dict(self._spent)
            atomic_write(self.root / "seconds.json", lambda tmp: tmp.write_text(json.dumps(spent, indent=2)))

    @classmethod
    def for_run(cls, requests: list[dict], hp, base_fingerprint: dict) -> "RunCheckpoint":
        from .distributed import is_main

        if hp.checkpoint_dir is None:
            return cls(None)
        run, stages, described = run_keys(requests, hp, base_fingerprint)
        ckpt = cls(Path(hp.checkpoint_dir).expanduser() / run, stages, writer=is_main(),
                   stage_hparams=described.pop("stage_hparams"))
        if (ckpt.root / "run.json").exists():
            if ckpt.writer and ckpt.resumed:  # ranks > 0 may see the run.json rank 0 has just written
                log.warning("resuming from checkpoint %s", ckpt.root)
        elif ckpt.writer:
            atomic_write(ckpt.root / "run.json", lambda tmp: tmp.write_text(json.dumps(described, indent=2,
                                                                                        default=str)))
        return ckpt

    def path(self, name: str) -> Path:
        """``name`` inside the open stage's folder."""
        if self._stage is None:
            raise RuntimeError("no stage is open: call begin(stage) first")
        return self.root / self.folders[self._stage[0]] / name

    def _writing(self) -> bool:
        """Whether saving writes; the first save in a stage's folder also records that stage's hparams there."""
        if self.root is None or not self.writer:
            return False
        described = self.path("hparams.json")
        if not described.exists():
            own = self._stage_hparams.get(self._stage[0], {})
            atomic_write(described, lambda tmp: tmp.write_text(json.dumps(own, indent=2, default=str)))
        return True

    def has(self, name: str) -> bool:
        """Whether ``name`` was saved whole (its hash recorded and matching): only then is it read."""
        return self.root is not None and name in self._hashes.get(self._stage[0], {}) and self.path(name).exists()

    def save_json(self, name: str, obj) -> None:
        if self._writing():
            atomic_write(self.path(name), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))
            self._written(name)

    def load_json(self, name: str):
        return json.loads(self.path(name).read_text())

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self._writing():
            plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
            atomic_write(self.path(name), lambda tmp: save_file(plain, str(tmp)))
            self._written(name)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(name)))

    def save_state(self, name: str, state: dict) -> None:
        """Training state (optimiser, scheduler, RNG): nested dicts of tensors and numbers."""
        if self._writing():
            atomic_write(self.path(name), lambda tmp: torch.save(state, tmp))
            self._written(name)

    def load_state(self, name: str) -> dict:
        return torch.load(self.path(name), weights_only=True)

    def save_encoder(self, name: str, encoder) -> None:
        if self._writing():
            atomic_dir(self.path(name), lambda tmp: encoder.save(str(tmp), create_model_card=False), replace=True)
            self._written(name)

    def load_encoder(self, name: str, device: str):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.path(name)), device=device)
