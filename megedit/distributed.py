"""Data parallelism across processes started by ``accelerate launch`` or ``torchrun``: the few helpers MeG needs.

Nothing here does anything in a single process: ``world_size()`` is 1, every collective returns its input, and the
training code takes exactly the path it takes without a launcher. Under a launcher (``WORLD_SIZE`` > 1), ``init()``
joins the process group through accelerate's ``PartialState`` (gloo on CPU, nccl on GPUs) and:

- stage 1 (the encoder) runs whole on every rank; the texts' embedding is split across ranks and all-gathered; stage 2
  (the gate) splits every batch like stage 4; then rank 0's encoder, gate and embeddings are broadcast, so every rank
  holds the same bits even where kernels are not deterministic;
- stage 3 shards the chunks of edits across ranks and all-gathers the fitted neurons in edit order;
- stage 4 splits every global batch across ranks and averages gradients (DDP's semantics, ``megedit.training``), so
  the optimiser sees the single-process batch;
- rank 0 alone writes checkpoints, results and artifacts, and prints.

CPU launch (2 processes, gloo)::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m megedit.cli edit hparams/MeG/smollm2-135m.yaml --data ... --num-edits 1000
    torchrun --nproc_per_node 2 -m megedit.cli edit hparams/MeG/smollm2-135m.yaml --data ... --num-edits 1000

(``accelerate launch --cpu --num_processes 2`` starts ONE process: use the flags above. Write ``--num-edits``, not
``--n``: the launchers' parsers would take ``--n`` for an abbreviation of one of their own options.)
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the launcher's process group (idempotent; nothing to do in a single process)."""
    if not launched() or dist.is_initialized():
        return
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState picks gloo only when told the run is on CPU; on a machine without GPUs it would otherwise fall
    # back to a single-process state
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """The device this rank works on: a bare "cuda" becomes this rank's GPU under a launcher."""
    if world_size() > 1 and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (any picklable value; tensors on CPU), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective(t: torch.Tensor, op) -> None:
    """Run ``op`` on ``t`` in place, through a copy on the backend's device where ``t`` lives elsewhere (nccl only
    moves GPU tensors; the embeddings, for one, are on the CPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if t.device == device:
        op(t)
        return
    moved = t.to(device)
    op(moved)
    t.copy_(moved)


def broadcast_tensors(tensors) -> None:
    """Overwrite ``tensors`` in place with rank 0's values."""
    if world_size() == 1:
        return
    for t in tensors:
        if t.numel():
            _collective(t.data, lambda x: dist.broadcast(x, src=0))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``t`` over ranks (in place, and returned)."""
    if world_size() > 1:
        _collective(t, dist.all_reduce)
    return t


def average_gradients(params) -> None:
    """DDP's gradient averaging without its wrapper: after ``backward`` every rank holds the mean of all ranks' grads.

    A parameter no rank's rows reached keeps ``grad`` None (AdamW then skips it, as in one process); one reached on
    some ranks only counts zeros for the others.
    """
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=params[0].device)
    flat = torch.cat([present] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    all_reduce_sum(flat)
    reached = flat[:len(params)].tolist()
    grads = (flat[len(params):] / world_size()).split([p.numel() for p in params])
    for p, g, seen in zip(params, grads, reached):
        p.grad = g.view_as(p).clone() if seen else None
