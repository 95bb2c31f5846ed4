"""A diffusion transformer (DiT) over 1-D weight vectors: the denoiser of stage 4.

Follows facebookresearch/DiT ``models.py`` (Peebles & Xie, 2023) with changes for MeG: the "image" is a vector of
neuron weights cut into patches of ``patch_size`` weights, and the class label is replaced by a sentence embedding of
the query, projected and added to the timestep embedding (the sum drives every adaLN modulation). With
``token_conditioning`` the embedding is also projected to one vector per patch and added to the input tokens: a class
label carries a few bits, a query embedding must be decoded into ~1k specific weights, and adaLN's per-channel scales
alone learn that map slowly (it took ~3x more steps to reach the same error on 300 edits).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_1d_sincos_pos_embed_from_grid

from .precision import attention_kernels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep -> hidden vector: sinusoidal frequencies, then a two-layer MLP (diffusers' blocks)."""

    def __init__(self, hidden: int, frequency_size: int = 256):
        super().__init__()
        self.frequencies = Timesteps(frequency_size, flip_sin_to_cos=True, downscale_freq_shift=0)  # DiT's layout
        self.mlp = TimestepEmbedding(frequency_size, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp.linear_1.weight.dtype))  # (N, D)


class ConditionEmbedder(nn.Module):
    """Query embedding -> hidden vector. While training, a fraction ``dropout`` of the rows get a learned null embedding
    instead (DiT's label dropout), so the model also learns an unconditional prediction."""

    def __init__(self, cond_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null = nn.Parameter(torch.zeros(hidden))
        self.dropout = dropout

    def forward(self, cond: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """``force_drop`` (N,) bool overrides the random choice of rows to drop (all False: drop none)."""
        emb = self.proj(cond)  # (N, D)
        drop = force_drop
        if drop is None and self.training and self.dropout > 0:
            drop = torch.rand(cond.shape[0], device=cond.device) < self.dropout
        if drop is not None:
            emb = torch.where(drop.unsqueeze(1), self.null.to(emb.dtype), emb)  # (N, D)
        return emb


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the conditioning sets a shift, a scale and a gate for the attention
    branch and for the MLP branch."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 × (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (N, T, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token back to its patch of weights."""

    def __init__(self, hidden: int, patch_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 × (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p)


class DiT(nn.Module):
    """Denoiser of a weight vector of length ``vector_size``, conditioned on a timestep and a ``cond_dim`` embedding.

    The vector is zero-padded to whole patches of ``patch_size`` weights (one token each) and the output cropped back,
    so any length works. The model predicts whatever the scheduler's ``prediction_type`` asks for (v, noise or sample).
    """

    def __init__(self, vector_size: int, cond_dim: int, patch_size: int = 64, hidden: int = 256, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, cond_dropout: float = 0.0, token_conditioning: bool = True):
        super().__init__()
        self.vector_size, self.patch_size = vector_size, patch_size
        self.num_patches = math.ceil(vector_size / patch_size)
        self.patch_embed = nn.Linear(patch_size, hidden)
        self.cond_tokens = nn.Linear(cond_dim, self.num_patches * hidden) if token_conditioning else None
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = ConditionEmbedder(cond_dim, hidden, cond_dropout)
        pos = get_1d_sincos_pos_embed_from_grid(hidden, torch.arange(self.num_patches), output_type="pt")
        self.register_buffer("pos_embed", pos.float().unsqueeze(0), persistent=False)  # (1, T, D), fixed
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch_size)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation. adaLN modulations and the output layer start at zero, so every block starts as the
        identity and an untrained model outputs exactly 0 (the mean target in normalised space)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The condition MLP keeps xavier: query embeddings are L2-normalised, so DiT's std 0.02 would mute them
        # (it made memorisation slower in tests).
        for linear in (self.t_embedder.mlp.linear_1, self.t_embedder.mlp.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.c_embedder.null, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, P) noisy weights, t (N,) or scalar timesteps, cond (N, cond_dim) -> (N, P) prediction."""
        N, P = x.shape
        if P != self.vector_size:
            raise ValueError(f"DiT was built for vectors of length {self.vector_size}, got {P}")
        x = F.pad(x, (0, self.num_patches * self.patch_size - P))  # (N, T*p): zeros up to whole patches
        x = self.patch_embed(x.reshape(N, self.num_patches, self.patch_size)) + self.pos_embed  # (N, T, D)
        drop = force_drop
        if drop is None and self.training and self.c_embedder.dropout > 0:
            drop = torch.rand(N, device=cond.device) < self.c_embedder.dropout  # (N,) decided once for both paths
        c = self.t_embedder(t.expand(N)) + self.c_embedder(cond, drop)  # (N, D)
        if self.cond_tokens is not None:
            tokens = self.cond_tokens(cond).reshape(N, self.num_patches, -1)  # (N, T, D)
            if drop is not None:
                tokens = tokens * (~drop).to(tokens.dtype)[:, None, None]  # a dropped condition is dropped here too
            x = x + tokens
        with attention_kernels(x):
            for block in self.blocks:
                x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p)
        return x.reshape(N, -1)[:, :P]  # (N, P)
