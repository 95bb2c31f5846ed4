"""Training mechanics shared by every stage that trains a network: resume, data-parallel gradients, rank-0 writes.

A stage module holds its model, its loss and its data; the loop's bookkeeping lives here:

- ``TrainingState`` saves and restores what an interrupted loop needs (network, optimiser, LR schedule, the
  ``torch.Generator`` that draws its batches and noise, and the loop's progress) under one name of the run's
  checkpoint (``megedit.checkpoint.RunCheckpoint``). Only rank 0 writes; every rank reads.
- ``start_in_sync`` gives every rank rank 0's weights before the first step, as DDP does.
- ``backward_on_shard`` computes the gradient of one global batch, each rank on its own slice of the rows, and
  averages the gradients over ranks (DDP's semantics), so the optimiser step is the single-process one.

In a single process all of this is the plain loop: ``backward_on_shard`` is ``zero_grad`` + ``backward``.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import distributed


class TrainingState:
    """The resumable state of one training loop, saved as ``name`` in the open stage of ``checkpoint``.

    ``parts`` name what is saved, in this order: modules, optimisers and LR schedulers (anything with
    ``state_dict``/``load_state_dict``) and ``torch.Generator`` objects (``get_state``/``set_state``). With
    ``checkpoint`` None nothing is read or written.
    """

    def __init__(self, checkpoint, name: str, **parts):
        self.checkpoint, self.name, self.parts = checkpoint, name, parts

    def resume(self) -> dict:
        """Restore every part from the saved state, if there is one; returns the saved progress (empty if none)."""
        if self.checkpoint is None or not self.checkpoint.has(self.name):
            return {}
        state = self.checkpoint.load_state(self.name)
        for key, part in self.parts.items():
            if isinstance(part, torch.Generator):
                part.set_state(state[key])
            else:
                part.load_state_dict(state[key])
        return {k: v for k, v in state.items() if k not in self.parts}

    def save(self, **progress) -> None:
        """Save every part and ``progress`` (epoch, steps, loss...); rank 0 alone writes (``RunCheckpoint.writer``)."""
        if self.checkpoint is None:
            return
        state = {key: part.get_state() if isinstance(part, torch.Generator) else part.state_dict()
                 for key, part in self.parts.items()}
        self.checkpoint.save_state(self.name, {**state, **progress})


def start_in_sync(module: torch.nn.Module) -> None:
    """Every rank starts from rank 0's weights (as DDP does); nothing to do in a single process."""
    distributed.broadcast_tensors(module.state_dict().values())


def backward_on_shard(loss_of: Callable[[slice | None], torch.Tensor | None], batch_rows: int, optimizer,
                      params) -> torch.Tensor | None:
    """Zero the gradients and backpropagate one batch of ``batch_rows`` rows; returns this rank's summed loss.

    ``loss_of(rows)`` is the mean loss over ``rows`` of the batch (None: all of them), or None where ``rows`` is
    empty. Single process: the whole batch's mean loss is backpropagated. Data-parallel: each rank takes its own
    contiguous slice of rows, weights its loss so that the average over ranks is the gradient of the whole batch's
    mean loss, and the gradients are averaged (``distributed.average_gradients``). The return value (detached) is the
    loss summed over this rank's rows, None if it has none: the sum over ranks is the batch's summed loss.
    """
    ranks, rank = distributed.world_size(), distributed.rank()
    if ranks == 1:
        loss = loss_of(None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach() * batch_rows
    mine = slice(rank * batch_rows // ranks, (rank + 1) * batch_rows // ranks)  # this rank's rows
    loss = loss_of(mine)
    optimizer.zero_grad(set_to_none=True)
    summed = None
    if loss is not None:
        n = mine.stop - mine.start
        (loss * (n * ranks / batch_rows)).backward()
        summed = loss.detach() * n
    distributed.average_gradients(params)
    return summed
