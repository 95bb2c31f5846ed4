"""Mixed precision for the training stages: ``torch.autocast`` to bfloat16 where the device multiplies it fast.

Training is matmul-bound: it embeds hundreds of thousands of texts, runs the frozen LLM over every view of every edit
and trains two networks. On a CPU with AVX512-BF16 or AMX (and on a GPU with bfloat16) those matmuls run several times
faster in bfloat16 (this project's 2-core CPU: ≈ 650 vs 90-150 GFLOP/s). Autocast lowers only the inputs of matmuls;
parameters, optimiser states and losses stay float32, and bfloat16 keeps float32's range, so no loss scaling is needed.

What runs at query time (the edited LLM, the encoder, the gate, the generator's sampling) and the choice of the gate's
thresholds stay in the model's own dtype: ``training_precision`` changes how the edit is learned, not how it is used.
Stage 1 (encoder tuning) stays float32 too: InfoNCE's scaled cosine logits need more than bfloat16's 8 bits of mantissa.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("float32", "bfloat16", "auto")


def has_fast_bfloat16(device) -> bool:
    """Whether ``device`` has native bfloat16 matmuls (else autocast would emulate them, slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private; absent from older torch
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The dtype the training stages autocast to (None: float32 throughout). ``auto``: bfloat16 where it is fast."""
    if precision not in PRECISIONS:
        raise ValueError(f"training_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bfloat16" or (precision == "auto" and has_fast_bfloat16(device)):
        return torch.bfloat16
    return None


def training_autocast(dtype: torch.dtype | None, device):
    """A context manager: autocast on ``device`` to ``dtype`` (from ``autocast_dtype``), or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    # cache_enabled=False: autocast caches the low-precision copy of each trainable weight until its context exits;
    # a stage runs many optimiser steps inside one context, and a cached copy would freeze its forward pass
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def attention_kernels(x: torch.Tensor):
    """On a CPU under bfloat16 autocast, PyTorch's flash-attention kernel is slower than plain math for the short
    sequences here: a DiT training step at batch 256 (~10 tokens) took 0.205 s with it, 0.133 s without; a 32-edit
    chunk of stage 3 (answer tokens attending to a cached prompt) 19.1 s vs 14.9 s. Elsewhere PyTorch chooses."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()
