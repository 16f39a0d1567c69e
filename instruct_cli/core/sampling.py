"""Batches for generation and for scoring what was generated.

Owns: left padding of prompts (`left_pad`), prompt + response as one sequence (`sequences`), and the
keyword arguments of `model.generate` for the sampling flags (`sampling_kwargs`). May use: torch.
"""

from __future__ import annotations

import torch

from instruct_cli.core.config import GenerateConfig


def sampling_kwargs(config: GenerateConfig, tokenizer) -> dict:
    """The keyword arguments of `model.generate` for the sampling flags."""
    kwargs = dict(
        max_new_tokens=config.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if config.greedy:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {
        **kwargs,
        "do_sample": True,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
    }  # 0 turns top-k off (None would fall back to the model's own setting)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask) tensors, as generation needs."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def sequences(query, query_mask, response, response_mask):
    """Prompt + response as one sequence: (input_ids, attention_mask, position_ids), each (B, P + T)."""
    input_ids = torch.cat([query, response], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids
