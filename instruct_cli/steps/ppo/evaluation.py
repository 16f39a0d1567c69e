"""PPO's held-out evaluation at every --eval-every iterations: reward, KL, length and EOS rate on the eval
prompts, and the samples shown on the console and appended to the run folder's samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from instruct_cli.core import chat, distributed
from instruct_cli.core.config import PPOConfig
from instruct_cli.core.console import console
from instruct_cli.steps.ppo.roles import POLICY, REFERENCE, Roles
from instruct_cli.steps.ppo.trajectory import (
    FunctionReward,
    pack_rows,
    packs,
    response_logprobs,
    rollout,
    score,
)


@torch.no_grad()
def evaluate(
    roles: Roles,
    tokenizer,
    prompts: list[list[dict]],
    config: PPOConfig,
    accelerator,
    function_reward: FunctionReward | None = None,
    columns: list[dict] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Mean normalised reward (missing-EOS penalty included, as `instruct eval` scores), KL to the
    reference, length and EOS rate on held-out prompts, plus the samples. Each process answers its share;
    every process gets the whole result."""
    rows = []
    share = [(index, prompts[index]) for index in distributed.my_share(len(prompts), accelerator)]
    for start in range(0, len(share), config.rollout_batch_size):
        chunk = share[start : start + config.rollout_batch_size]
        encoded = [chat.encode_prompt(tokenizer, messages) for _, messages in chunk]
        batch = rollout(roles, tokenizer, encoded, config, accelerator)
        with accelerator.autocast():
            messages = [m for _, m in chunk]
            chunk_columns = [columns[index] for index, _ in chunk] if columns else None
            scores = score(
                roles, batch, config.missing_eos_penalty, function_reward, messages, config.packing, 1, chunk_columns
            )
            packed = pack_rows(*batch[:4]) if packs(roles, config) else None
            policy, _ = response_logprobs(roles, POLICY, *batch[:4], config.temperature, packed)
            reference, _ = response_logprobs(roles, REFERENCE, *batch[:4], config.temperature, packed)
        kls = ((policy - reference) * batch.response_mask).sum(1)
        for row, (index, messages) in enumerate(chunk):
            ids = batch.response[row][batch.response_mask[row].bool()]
            rows.append(
                {
                    "index": index,
                    "prompt": messages,
                    "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    "reward": scores[row].item(),
                    "kl": kls[row].item(),
                    "length": int(batch.response_mask[row].sum()),
                    "eos": bool(batch.ended[row]),
                }
            )
    rows = sorted(distributed.gather_lists(accelerator, rows), key=lambda row: row["index"])
    metrics = {
        "eval/reward": sum(r["reward"] for r in rows) / len(rows),
        "eval/kl": sum(r["kl"] for r in rows) / len(rows),
        "eval/length": sum(r["length"] for r in rows) / len(rows),
        "eval/eos_rate": sum(r["eos"] for r in rows) / len(rows),
    }
    samples = [{"prompt": r["prompt"], "response": r["response"], "reward": r["reward"]} for r in rows]
    return metrics, samples


def show_samples(samples: list[dict], iteration: int, how_many: int = 2) -> None:
    """Print a few prompt/response pairs with their reward."""
    for sample in samples[:how_many]:
        prompt = sample["prompt"][-1]["content"]
        console.print(
            f"[dim]iter {iteration}[/dim] [bold]{prompt[:80]}[/bold] -> {sample['response'][:160]!r} "
            f"[dim](reward {sample['reward']:.2f})[/dim]"
        )


# --------------------------------------------------------------------------------------------- samples
def append_samples(folder: Path, iteration: int, samples: list[dict]) -> None:
    """Append an evaluation's samples to samples.jsonl."""
    with open(folder / "samples.jsonl", "a", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({"iteration": iteration, **sample}, ensure_ascii=False) + "\n")
