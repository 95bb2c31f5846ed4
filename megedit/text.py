"""Tokenising "prompt + answer" the way EasyEdit's teacher-forced metrics do: ``prompt + " " + answer``, the one place
that joint text is written (neuron fitting, evaluation and EasyEdit's length checks all use it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AnsweredBatch:
    """Right-padded ``prompt + " " + answer`` sequences and where each answer token sits.

    ``answer_seq[i], answer_pos[i]`` is the position whose logits predict answer token ``answer_ids[i]``
    (one before the token itself); ``answer_row[i]`` says which prompt it belongs to.
    """

    input_ids: torch.Tensor  # (S, T)
    attention_mask: torch.Tensor  # (S, T)
    answer_seq: torch.Tensor  # (n,)
    answer_pos: torch.Tensor  # (n,)
    answer_ids: torch.Tensor  # (n,)
    prompt_lengths: list[int]


def answered(prompt: str, answer: str) -> str:
    """The text a teacher-forced metric feeds: the prompt, a space, the answer."""
    return prompt + " " + answer


def tokenize_answered(tok, prompts: list[str], answers: list[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each ``answered(prompt, answer)`` and the token length of each prompt alone."""
    full = tok([answered(p, a) for p, a in zip(prompts, answers)])["input_ids"]
    plen = [len(ids) for ids in tok(list(prompts))["input_ids"]]
    return full, plen


def encode_answered(tok, prompts: list[str], answers: list[str]) -> AnsweredBatch:
    full, plen = tokenize_answered(tok, prompts, answers)
    T = max(len(f) for f in full)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(full), T), pad, dtype=torch.long)
    mask = torch.zeros((len(full), T), dtype=torch.long)
    seq, pos, tgt = [], [], []
    for i, (f, pl) in enumerate(zip(full, plen)):
        ids[i, : len(f)] = torch.tensor(f)
        mask[i, : len(f)] = 1
        for j in range(max(pl, 1), len(f)):
            seq.append(i)
            pos.append(j - 1)
            tgt.append(f[j])
    return AnsweredBatch(ids, mask, torch.tensor(seq), torch.tensor(pos), torch.tensor(tgt), plen)
