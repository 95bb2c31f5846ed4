"""Apply MeG to a model: the four stages in order, and the EasyEdit-shaped entry point.

1. tune the text encoder (InfoNCE with hard negatives, on pseudo-edits)
2. train the familiarity gate on the edits' views and near misses; choose ε on held-out calibration queries
3. fit one neuron per edit on its views
4. train the generator to map a query embedding to its edit's neuron

Under ``accelerate launch`` / ``torchrun`` the same call runs data-parallel (see ``megedit.distributed``).
"""
from __future__ import annotations

import copy as copy_module
import logging
import random
import time
from dataclasses import dataclass, field

import torch

from . import distributed
from .arch import arch_of, base_fingerprint, check_layer, mlp_of, neuron_size
from .augment import NEAR_MISS_KINDS, PseudoEditPool
from .checkpoint import RunCheckpoint, rng_state, set_rng_state
from .data import load_requests, validate_requests
from .encoder import embed, tune_encoder
from .familiarity import FamiliarityNet, choose_thresholds, train_familiarity
from .fitting import fit_neurons
from .generator import NeuronGenerator
from .hparams import MeGHyperParams
from .leakage import HeldOutTexts
from .loading import load_encoder
from .model import MeGEdit, MeGModel
from .neuron import remove_neuron
from .precision import autocast_dtype, training_autocast
from .relation import fit_relation_check

log = logging.getLogger(__name__)
# why a request without a subject is refused rather than trained on
MEG_NEEDS_SUBJECT = ("MeG builds each edit's near misses from its subject (the same subject asked another relation, "
                     "another subject asked the same relation), which teach the gate what not to route; without it the "
                     "gate learns from weaker near misses. Give each request the subject, a substring of its prompt")


@dataclass
class TrainingTexts:
    """Every text the stages learn from, built from the edits and the pseudo-edit pool (never evaluation prompts)."""

    views: list[list[str]]  # per edit: its prompt first, then its training views
    positives: list[str]  # views and views + " " + target_new
    positive_edit: list[int]
    negatives: list[str]  # near misses, bare and answered
    calib_familiar: list[str]  # held-out views of the edits
    calib_unfamiliar: dict[str, list[str]] = field(default_factory=dict)  # held-out near misses per kind
    calib_familiar_edit: list[int] = field(default_factory=list)  # the edit of each calib_familiar text


def load_pool(requests: list[dict], hp: MeGHyperParams) -> PseudoEditPool | None:
    """The pseudo-edit pool (from ``pseudo_edit_offset`` on), without any record about an edited subject; None when the
    hparams name none."""
    if not hp.pseudo_edit_data:
        return None
    return PseudoEditPool(load_requests(hp.pseudo_edit_format, hp.pseudo_edit_data, offset=hp.pseudo_edit_offset),
                          exclude_subjects={r.get("subject") for r in requests if r.get("subject")}, seed=hp.seed)


def build_texts(requests: list[dict], pool: PseudoEditPool | None, hp: MeGHyperParams,
                held_out: HeldOutTexts | None = None) -> TrainingTexts:
    """The stages' texts; any that contains, or lies inside, an evaluation text of any request is left out (and
    counted in ``held_out``). An edit's own prompt is always kept: it is the fact being edited."""
    held_out = held_out if held_out is not None else HeldOutTexts(requests)
    views, positives, positive_edit, negatives = [], [], [], []
    calib_familiar: list[str] = []
    calib_familiar_edit: list[int] = []
    calib_unfamiliar: dict[str, list[str]] = {k: [] for k in NEAR_MISS_KINDS}
    rng = random.Random(hp.seed)
    calib_edits = set(rng.sample(range(len(requests)), min(hp.familiarity_holdout, len(requests))))
    for e, r in enumerate(requests):
        v = pool.views(r, hp.n_paraphrase_views, hp.n_prefix_views) if pool else [r["prompt"]]
        v = v[:1] + [t for t, _ in held_out.keep_pairs([(t, r["target_new"]) for t in v[1:]], "views")]
        views.append(v)
        for text in v:
            positives += [text, f"{text} {r['target_new']}"]  # routing also sees prompt + answer (teacher forcing)
            positive_edit += [e, e]
        if pool is None:
            continue
        for kind, pairs in pool.near_misses(r, hp.n_near_misses).items():
            for text, answer in held_out.keep_pairs(pairs, f"near_misses.{kind}"):
                negatives += [text, f"{text} {answer}".strip()]
        if e in calib_edits:
            seen = set(v)
            held = [t for t in pool.views(r, hp.n_paraphrase_views, hp.n_prefix_views, salt="calibration") if t not in seen]
            held = [t for t, _ in held_out.keep_pairs([(t, r["target_new"]) for t in held], "calibration.familiar")]
            calib_familiar += held[:2] + [f"{t} {r['target_new']}" for t in held[:1]]
            calib_familiar_edit += [e] * (len(held[:2]) + len(held[:1]))
            trained = set(negatives)
            for kind, pairs in pool.near_misses(r, 1, salt="calibration").items():
                pairs = held_out.keep_pairs(pairs, f"calibration.{kind}")
                calib_unfamiliar[kind] += [t for t, a in pairs if t not in trained]
                calib_unfamiliar[kind] += [f"{t} {a}".strip() for t, a in pairs if f"{t} {a}".strip() not in trained]
    return TrainingTexts(views, positives, positive_edit, negatives, calib_familiar, calib_unfamiliar,
                         calib_familiar_edit)


def _embed_all(encoder, groups: dict[str, list[str]], batch_size: int, progress: bool) -> dict[str, torch.Tensor]:
    """Embed every distinct text once."""
    unique = list(dict.fromkeys(t for texts in groups.values() for t in texts))
    ranks = distributed.world_size()
    if ranks == 1:
        emb = embed(encoder, unique, batch_size, progress=progress)  # 240,000 texts at 10,000 edits: minutes
    else:  # data-parallel: each rank embeds every ranks-th text, and every rank receives them all
        parts = distributed.all_gather_objects(embed(encoder, unique[distributed.rank()::ranks], batch_size,
                                                     progress=progress))
        emb = torch.empty(len(unique), parts[0].shape[1])
        for r, part in enumerate(parts):
            emb[r::ranks] = part
    index = {t: i for i, t in enumerate(unique)}
    return {k: emb[[index[t] for t in texts]] if texts else emb[:0] for k, texts in groups.items()}


def _stage1_encoder(pool: PseudoEditPool | None, hp: MeGHyperParams, device, ckpt: RunCheckpoint, progress: bool,
                    held_out: HeldOutTexts):
    """The (tuned) text encoder and its training report (None when it was not tuned)."""
    if ckpt.has("stage1.json"):
        encoder = ckpt.load_encoder("stage1_encoder", str(device))
        set_rng_state(ckpt.load_tensors("stage1_rng.safetensors"))  # as if stage 1 had just run
        report = ckpt.load_json("stage1.json")["report"]
        if report is not None:  # the pairs it left out, for this run's leakage count
            held_out.left_out["encoder_pairs"] += report.get("left_out_leaking_pairs", 0)
        return encoder.requires_grad_(False), report
    encoder = load_encoder(hp.encoder_name, device=str(device))
    report = None
    if hp.encoder_tune and pool is not None:
        report = {k: v for k, v in tune_encoder(encoder, pool, hp, progress, held_out).items() if k != "loss"}
        report["left_out_leaking_pairs"] = held_out.left_out["encoder_pairs"]
        ckpt.save_encoder("stage1_encoder", encoder)
        ckpt.save_tensors("stage1_rng.safetensors", rng_state())
        ckpt.save_json("stage1.json", {"report": report})  # last: stage 1 is complete
    return encoder.requires_grad_(False), report


def _stage2_gate(emb: dict, texts: TrainingTexts, n_edits: int, hp: MeGHyperParams, device, ckpt: RunCheckpoint,
                 progress: bool, autocast: torch.dtype | None) -> tuple[FamiliarityNet, dict]:
    """The familiarity gate with its thresholds, and {"familiarity": training report, "gate": thresholds report}."""
    g = torch.Generator().manual_seed(hp.seed)
    edit_class = torch.randint(hp.familiarity_classes, (n_edits,), generator=g)
    bare = torch.tensor([i % 2 == 0 for i in range(len(texts.positives))])  # positives alternate view, view + answer
    familiarity = FamiliarityNet(emb["pos"].shape[1], hp.familiarity_hidden, hp.familiarity_blocks,
                                 hp.familiarity_classes, n_keys=int(bare.sum())).to(device)
    if ckpt.has("stage2.json"):
        saved = ckpt.load_tensors("stage2.safetensors")
        familiarity.load_state_dict({k: v for k, v in saved.items() if not k.startswith("rng.")})
        set_rng_state({k[len("rng."):]: v for k, v in saved.items() if k.startswith("rng.")})
        return familiarity.requires_grad_(False), ckpt.load_json("stage2.json")
    familiarity.keys.copy_(emb["pos"][bare].half())
    calib_unfamiliar = {k: emb[f"calib_{k}"] for k in texts.calib_unfamiliar}
    calibrated = calib_unfamiliar and any(len(v) for v in calib_unfamiliar.values())
    with training_autocast(autocast, device):  # the thresholds below: in query time's precision
        report = {"familiarity": train_familiarity(familiarity, emb["pos"], edit_class[texts.positive_edit],
                                                   emb["neg"], hp, progress, checkpoint=ckpt,
                                                   calibration=(emb["calib"], calib_unfamiliar) if calibrated
                                                   and hp.familiarity_curve else None)}
    if calibrated:
        report["gate"] = choose_thresholds(familiarity, emb["calib"], calib_unfamiliar, hp.familiarity_epsilon)
    else:  # no pool, no calibration: the configured epsilon alone
        familiarity.epsilon.fill_(hp.familiarity_epsilon)
        report["gate"] = {"epsilon": hp.familiarity_epsilon, "tau": -1.0}
    ckpt.save_tensors("stage2.safetensors", {**familiarity.state_dict(),
                                             **{f"rng.{k}": v for k, v in rng_state().items()}})
    ckpt.save_json("stage2.json", report)
    return familiarity.requires_grad_(False), report


def _fit_report(fit, requests: list[dict]) -> dict:
    case_ids = [r.get("case_id", i) for i, r in enumerate(requests)]
    nonfinite = ~(torch.isfinite(fit.weights).all(dim=1) & torch.isfinite(fit.loss))
    if nonfinite.any():
        log.warning("neuron fits of case_ids %s gave NaN/inf: marked failed and left out of generator training",
                    [case_ids[i] for i in nonfinite.nonzero().squeeze(1).tolist()])
    if not fit.ok.any():
        why = f"; {int(nonfinite.sum())} of them gave NaN/inf: check the model's weights or lower fit_lr" \
            if nonfinite.any() else ""
        raise RuntimeError(f"no neuron fit reproduced its target (case_ids {case_ids}{why}): raise fit_steps or "
                           "fit_lr, or choose another layer")
    return {"ok": float(fit.ok.float().mean()), "view_acc": float(fit.view_acc.mean()),
            "mean_steps": float(fit.steps.float().mean()),
            "failed_case_ids": [case_ids[i] for i in (~fit.ok).nonzero().squeeze(1).tolist()],
            "nonfinite_case_ids": [case_ids[i] for i in nonfinite.nonzero().squeeze(1).tolist()]}


def train_meg(model, tok, requests: list[dict], hp: MeGHyperParams, progress: bool = True) -> tuple[MeGEdit, dict]:
    """Run the four stages; returns the learned edit and a report (seconds per stage, gate rates, fit stats).

    With ``hp.checkpoint_dir`` set, each stage's output is saved as it is made and an interrupted run resumes there.
    Under a launcher with several processes, every rank calls this and gets the same edit (``megedit.distributed``).
    """
    distributed.init()
    progress = progress and distributed.is_main()
    requests = validate_requests(requests, need_subject=MEG_NEEDS_SUBJECT)
    check_layer(model, hp.layer)
    if hp.pseudo_edit_data is None and hp.familiarity_epsilon is None:
        raise ValueError("without pseudo_edit_data there is nothing to choose epsilon on: set familiarity_epsilon, "
                         "or point pseudo_edit_data at a training split disjoint from the edits")
    fingerprint = base_fingerprint(model, hp.layer)
    ckpt = RunCheckpoint.for_run(requests, hp, fingerprint)
    torch.manual_seed(hp.seed)
    # the edited MLP's device: with a device_map it may not be the embeddings', and the neuron's weights go there
    device = next(mlp_of(model, hp.layer).parameters()).device
    autocast = autocast_dtype(hp.training_precision, device)  # resolved once, before any stage runs
    report: dict = {"n_edits": len(requests), "seed": hp.seed, "seconds": {},
                    "training_autocast": str(autocast).removeprefix("torch.") if autocast else "float32"}
    if distributed.world_size() > 1:
        report["world_size"] = distributed.world_size()
    if ckpt.root is not None:
        report["checkpoint"] = str(ckpt.root)
    if ckpt.resumed:
        report["resumed"] = True
    t0 = time.time()
    pool = load_pool(requests, hp)
    held_out = HeldOutTexts(requests)  # no training text may contain, or lie inside, any of their evaluation texts
    texts = build_texts(requests, pool, hp, held_out)
    report["seconds"]["views"] = time.time() - t0

    ckpt.begin("stage1_encoder")  # checkpointed stages: their seconds include earlier processes' saved work
    encoder, encoder_report = _stage1_encoder(pool, hp, device, ckpt, progress, held_out)
    report["leakage"] = held_out.report()
    if encoder_report is not None:
        report["encoder"] = encoder_report
    report["seconds"]["stage1_encoder"] = ckpt.seconds()

    ckpt.begin("embed")
    if ckpt.has("embeddings.safetensors"):
        emb = ckpt.load_tensors("embeddings.safetensors")
    else:
        groups = {"pos": texts.positives, "neg": texts.negatives, "calib": texts.calib_familiar,
                  **{f"calib_{k}": v for k, v in texts.calib_unfamiliar.items()}}
        with training_autocast(autocast, device):
            emb = _embed_all(encoder, groups, hp.eval_batch_size * 4, progress)
        ckpt.save_tensors("embeddings.safetensors", emb)
    report["seconds"]["embed"] = ckpt.seconds()

    ckpt.begin("stage2_familiarity")
    familiarity, gate_report = _stage2_gate(emb, texts, len(requests), hp, device, ckpt, progress, autocast)
    report.update(gate_report)
    # stage 1 ran whole on every rank, the embedding and stage 2 split; rank 0's results make every rank's identical
    distributed.broadcast_tensors([*encoder.state_dict().values(), *familiarity.state_dict().values(), *emb.values()])
    report["seconds"]["stage2_familiarity"] = ckpt.seconds()

    ckpt.begin("stage3_neurons")
    # the gate and the generator learn from every view; the fits may use fewer (stage 3's cost is linear in views)
    fit_views = [v[:hp.fit_views] for v in texts.views] if hp.fit_views else texts.views
    with training_autocast(autocast, device):
        fit = fit_neurons(model, tok, fit_views, [r["target_new"] for r in requests], hp, progress, checkpoint=ckpt)
    report["fit"] = _fit_report(fit, requests)
    report["seconds"]["stage3_neurons"] = ckpt.seconds()

    ckpt.begin("stage4_generator")
    generator = NeuronGenerator(neuron_size(model), emb["pos"].shape[1], hp).to(device)
    ok = fit.ok.clone()
    keep = torch.tensor([bool(ok[e]) for e in texts.positive_edit])
    remap = torch.cumsum(ok.long(), 0) - 1  # edit index -> row of the ok-only target table
    # the calibration edits' unseen views: a held-out record of how well the generator reaches paraphrases
    calib_edit = torch.tensor(texts.calib_familiar_edit, dtype=torch.long)
    calib_ok = ok[calib_edit] if len(calib_edit) == len(emb["calib"]) else \
        torch.zeros(len(emb["calib"]), dtype=torch.bool)  # embeddings from an older checkpoint: no record
    # (not `held_out`: that name holds the evaluation texts no training text may contain, read again below)
    unseen_views = (emb["calib"][calib_ok], remap[calib_edit[calib_ok]]) if calib_ok.any() else None
    with training_autocast(autocast, device):
        report["generator"] = generator.train_on(emb["pos"][keep], remap[torch.tensor(texts.positive_edit)[keep]],
                                                 fit.weights[ok], hp, progress, checkpoint=ckpt,
                                                 held_out=unseen_views)
    generator.requires_grad_(False)
    report["seconds"]["stage4_generator"] = ckpt.seconds()
    edits = [{k: r.get(k) for k in ("case_id", "prompt", "subject", "target_new")} for r in requests]
    key_edit = texts.positive_edit[0::2]  # the gate's keys are the bare views: every other positive
    relation = None
    if hp.relation_check:  # query-time only, from the tuned encoder and the views: cheap, never checkpointed
        t0 = time.time()
        relation, report["relation"] = fit_relation_check(encoder, requests, texts.views, pool, hp, held_out)
        report["seconds"]["relation_check"] = time.time() - t0
        report["leakage"] = held_out.report()  # now with the calibration texts it left out
    return MeGEdit(encoder, familiarity, generator, hp.layer, hp, base_fingerprint=fingerprint, edits=edits,
                   key_edit=key_edit, relation=relation), report


def apply_meg_to_model(model, tok, requests, hparams: MeGHyperParams, copy: bool = False,
                       return_orig_weights: bool = False, keep_original_weight: bool = False, **kwargs):
    """EasyEdit's ``apply_<alg>_to_model``: returns ``(edited_model, weights_copy)``.

    MeG changes no weight of ``model``: it hooks one MLP. ``edited_model.unload()`` takes the neuron out and returns the
    original model bit-for-bit; ``weights_copy`` (when asked for) holds copies of that MLP's parameters under their
    original names, which is what EasyEdit restores from.
    """
    requests = validate_requests(requests, need_subject=MEG_NEEDS_SUBJECT)
    if not isinstance(hparams, MeGHyperParams):
        raise TypeError(f"hparams must be a MeGHyperParams (e.g. MeGHyperParams.from_hparams('hparams/MeG/"
                        f"smollm2-135m.yaml')), got {type(hparams).__name__}")
    check_layer(model.model if isinstance(model, MeGModel) else model, hparams.layer)
    if isinstance(model, MeGModel):  # editing again replaces the previous MeG edit
        model = copy_module.deepcopy(model.model) if copy else model.unload()
    elif copy:
        model = copy_module.deepcopy(model)
    remove_neuron(model)
    weights_copy = {}
    if return_orig_weights:
        prefix = f"{_layers_path(model)}.{hparams.layer}."
        weights_copy = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}
    edit, report = train_meg(model, tok, requests, hparams, progress=kwargs.get("progress", True))
    edited = MeGModel(model, tok, edit)
    edited.report = report
    return edited, weights_copy


def _layers_path(model) -> str:
    return arch_of(model).layers
