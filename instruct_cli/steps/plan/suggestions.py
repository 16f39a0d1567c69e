"""What would make a step fit: single config changes that lower its memory (`candidate_changes`) and the
mildest of them, alone or together, that fit a card (`suggest`).

Uses `estimate` (StepPlan re-estimates itself with a changed config, `usable_memory`) and `gpus` (`gib`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from instruct_cli.core.methods import ADVANTAGE_ESTIMATORS

from .estimate import StepPlan, usable_memory
from .gpus import gib


def _halvings(value: int, floor: int = 1) -> list[int]:
    """value/2, value/4, ... down to `floor`."""
    out = []
    while value // 2 >= floor and value > floor:
        value //= 2
        out.append(value)
    return out


def candidate_changes(step: str, config: Any) -> list[tuple[str, Callable[[Any], Any]]]:
    """Single changes to a step's config that lower its memory, each as (description, config -> config),
    in the order they cost the least in quality or speed."""
    changes: list[tuple[str, Callable[[Any], Any]]] = []
    if hasattr(config, "gradient_checkpointing") and not config.gradient_checkpointing and step != "eval":
        changes.append(("gradient_checkpointing: true", lambda c: replace(c, gradient_checkpointing=True)))
    if config.quantization != "nf4":
        changes.append(("quantization: nf4", lambda c: replace(c, quantization="nf4")))
    if step in ("sft", "rm", "dpo"):
        for size in _halvings(config.batch_size):
            accum = config.grad_accum * config.batch_size // size
            changes.append(
                (
                    f"batch_size: {size}, grad_accum: {accum} (same global batch)",
                    lambda c, size=size, accum=accum: replace(c, batch_size=size, grad_accum=accum),
                )
            )
        for length in _halvings(config.max_length, 128):
            changes.append((f"max_length: {length}", lambda c, n=length: replace(c, max_length=n)))
    elif step == "ppo":
        for size in _halvings(config.minibatch_size):
            changes.append((f"minibatch_size: {size}", lambda c, n=size: replace(c, minibatch_size=n)))
        group = ADVANTAGE_ESTIMATORS[config.advantage].group_size(config.samples_per_prompt)
        for size in _halvings(config.rollout_batch_size, max(config.minibatch_size, group, 1)):
            if size % group:
                continue
            changes.append((f"rollout_batch_size: {size}", lambda c, n=size: replace(c, rollout_batch_size=n)))
        for length in _halvings(config.max_prompt_length, 64):
            changes.append((f"max_prompt_length: {length}", lambda c, n=length: replace(c, max_prompt_length=n)))
        for length in _halvings(config.max_new_tokens, 16):
            changes.append((f"max_new_tokens: {length}", lambda c, n=length: replace(c, max_new_tokens=n)))
    elif step == "eval":
        for size in _halvings(config.batch_size):
            changes.append((f"batch_size: {size}", lambda c, n=size: replace(c, batch_size=n)))
        for length in _halvings(config.max_length, 128):
            changes.append((f"max_length: {length}", lambda c, n=length: replace(c, max_length=n)))
    if hasattr(config, "lora_r"):
        for rank in _halvings(config.lora_r, 4):
            changes.append((f"lora_r: {rank}", lambda c, n=rank: replace(c, lora_r=n)))
    return changes


def suggest(plan: StepPlan, memory: int, device: str = "cuda") -> list[str]:
    """Changes that make a step fit `memory` bytes, each with the peak it gives.

    For each setting, the mildest single change that fits on its own. If none does: settings are added at
    their strongest, in the order of `candidate_changes`, until the step fits, and then each is relaxed back
    to its mildest value that still fits; if even all of them together do not fit, say how much it needs.
    """
    usable = usable_memory(memory, device)
    options: dict[str, list[tuple[str, Callable]]] = {}  # knob -> its changes, mildest first
    for description, change in candidate_changes(plan.step, plan.config):
        options.setdefault(description.split(":")[0], []).append((description, change))

    def total(changes: list[tuple[str, Callable]]) -> int:
        config = plan.config
        for _, change in changes:
            config = change(config)
        return plan.estimate(config, device).total

    single = []
    for knob_options in options.values():
        for option in knob_options:
            if total([option]) <= usable:
                single.append(f"{option[0]} -> {gib(total([option]))}")
                break
    if single:
        return single
    chosen: dict[str, tuple[str, Callable]] = {}
    for knob, knob_options in options.items():
        chosen[knob] = knob_options[-1]
        if total(list(chosen.values())) <= usable:
            break
    else:
        peak = total(list(chosen.values()))
        return [
            f"does not fit even with {', '.join(d for d, _ in chosen.values())} ({gib(peak)}): it needs "
            f"{gib(memory - usable + peak)} or more"
        ]
    for knob in reversed(list(chosen)):  # relax each setting as far as the rest allows
        for option in options[knob]:
            if total(list({**chosen, knob: option}.values())) <= usable:
                chosen[knob] = option
                break
    return ["together: " + ", ".join(d for d, _ in chosen.values()) + f" -> {gib(total(list(chosen.values())))}"]
