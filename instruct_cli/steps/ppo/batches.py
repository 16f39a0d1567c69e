"""What each PPO iteration trains on, as pure functions of (seed, process, iteration), so a resumed run needs
no state of its own: the prompts it samples (`iteration_prompts`) and its PPO-ptx batches of SFT
demonstrations (`ptx_batches`)."""

from __future__ import annotations

import random
from pathlib import Path

from instruct_cli.core import chat, data_folders, lm
from instruct_cli.core.config import PPOConfig
from instruct_cli.steps.ppo.trajectory import group_size


def prompt_batches(count: int, batch_size: int, seed: int, iteration: int) -> list[int]:
    """Indices of the prompts of iteration `iteration`: a fresh shuffle per pass over the data."""
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(iteration, per_epoch)
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    chosen = order[position * batch_size : (position + 1) * batch_size]
    return chosen if len(chosen) == batch_size else (order * batch_size)[:batch_size]


def iteration_prompts(count: int, config: PPOConfig, iteration: int, accelerator) -> list[int]:
    """This process's prompts of iteration `iteration`: the global batch of rollout_batch_size / K x processes
    prompts is formed as one process would form it, and process r takes its r-th contiguous share (so the
    trajectory's rows, process 0's first, are the global batch in order)."""
    size, rank = config.rollout_batch_size // group_size(config), accelerator.process_index
    chosen = prompt_batches(count, size * accelerator.num_processes, config.seed, iteration)
    return chosen[rank * size : (rank + 1) * size]


def ptx_batches(config: PPOConfig, tokenizer, sft_manifest: dict, device, accelerator):
    """PPO-ptx batches of SFT demonstrations (from --ptx-data, or the SFT run's own data): iteration ->
    minibatch number -> batch. A pure function of (seed, process, iteration, minibatch), so resuming needs
    no state of its own."""
    folder = config.ptx_data or Path(sft_manifest["parents"]["data"]["path"])
    rows = data_folders.read_split(folder, "sft.train")
    encoded = [chat.encode_conversation(tokenizer, row["messages"], 1024) for row in rows]
    rank = accelerator.process_index

    def for_iteration(iteration: int):
        def batch(number: int) -> dict:
            rng = random.Random(f"ptx-{config.seed}-{rank}-{iteration}-{number}")
            chosen = rng.sample(encoded, k=min(config.minibatch_size, len(encoded)))
            return lm.collate(chosen, tokenizer.pad_token_id, device)

        return batch

    return for_iteration
