"""What data parallelism needs beyond accelerate, for loops that do their own reductions (PPO).

accelerate starts the processes, seeds them (seed + process index) and averages DDP gradients for sft and
rm. PPO runs two backward passes through different adapters per minibatch, which DDP's hooks do not fit,
so it sums its statistics and gradients itself with these helpers. On one process each is the identity.
May use: torch.
"""

from __future__ import annotations

from typing import Callable

import torch


def summer(accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that sums a tensor over all processes (the identity on one process)."""
    if accelerator.num_processes == 1:
        return lambda tensor: tensor
    return lambda tensor: accelerator.reduce(tensor.detach(), reduction="sum")  # reduce works on a copy


def sum_gradients(accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over processes (a missing gradient counts as zeros). Each process's loss
    is its share of the global mean, so the sum is the gradient of the whole batch."""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        parameter.grad = accelerator.reduce(grad, reduction="sum")


def sum_stats(accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Each statistic summed over processes (all processes must pass the same names)."""
    if accelerator.num_processes == 1:
        return stats
    names = sorted(stats)
    values = torch.tensor([stats[name] for name in names], dtype=torch.float64, device=accelerator.device)
    return dict(zip(names, accelerator.reduce(values, reduction="sum").tolist()))


def gather_lists(accelerator, items: list) -> list:
    """Every process's `items`, concatenated in process order, on every process."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def my_share(count: int, accelerator) -> range:
    """The indices of `count` items that this process handles: every num_processes-th, from its index."""
    return range(accelerator.process_index, count, accelerator.num_processes)
