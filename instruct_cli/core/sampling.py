"""Sampling, and batches for generation and for scoring what was generated.

Owns: `sample`, which draws from exactly softmax(logits / T) with the top-k / top-p asked for — the model's
own generation_config (repetition_penalty, no_repeat_ngram_size, min_new_tokens, suppress_tokens, ...) is
set aside, so that log-probs recomputed later describe what was sampled (PPO's rollouts, eval's KL, label);
left padding of prompts (`left_pad`); prompt + response as one sequence (`sequences`); and the keyword
arguments of `model.generate` for the sampling flags (`sampling_kwargs`); one answer streamed to stdout
(`stream_to_stdout`, for generate and chat). May use: config.
"""

from __future__ import annotations

import contextlib
import sys

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


def stream_to_stdout(model, tokenizer, ids: list[int], config: GenerateConfig) -> str:
    """One answer to the prompt `ids` with the sampling flags of `config` (generate's or chat's), its text
    printed to stdout as it comes; returns the whole answer."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=streamer,
            **sampling_kwargs(config, tokenizer),
        )
    sys.stdout.flush()
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


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


def sample(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, **settings) -> torch.Tensor:
    """`model.generate` (prompt + response ids) with only the `settings` given (temperature, top_k, top_p,
    max_new_tokens, ...) and the tokenizer's EOS and pad: nothing from the model's generation_config."""
    settings = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **settings}
    with plain_generation_config(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)


@contextlib.contextmanager
def plain_generation_config(model):
    """Swap the model's generation_config for transformers' defaults while the block runs.

    Passing `generation_config=` to generate is not enough: transformers fills every field left unset in it
    from the model's own generation_config, so a repetition penalty the model ships would still apply."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        inner.generation_config = saved
