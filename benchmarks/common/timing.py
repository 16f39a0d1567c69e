"""Timing training loops step by step, the same way on both sides of bench_sft/bench_rm: a TrainerCallback
that records when each optimizer step ends, a collator wrapper that records each step's batch, the steps a
run is timed over (2..N-1), and a side's numbers (tokens/s, rows/s, padding, ...) from those records."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .data import read_jsonl


def step_batches(lengths: list[int], batch_size: int, seed: int, max_steps: int) -> list[list[int]]:
    """Row indices of each optimizer step, as training.fit walks `training.length_grouped_batches` with one
    process and no accumulation (each epoch's batches built once)."""
    from instruct_cli.core import training

    steps, epoch = [], 0
    while len(steps) < max_steps:
        steps.extend(training.length_grouped_batches(lengths, batch_size, seed, epoch))
        epoch += 1
    return steps[:max_steps]


def step_timer_callback():
    """A transformers TrainerCallback recording when training starts and when each optimizer step ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.step_ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    return StepTimer()


class CountingCollator:
    """Wraps a data collator and records, per batch, its rows, non-pad tokens and padded size.

    With num_workers=0 the DataLoader collates batches in order (accelerate fetches one ahead), so the first
    N records are the batches of optimizer steps 1..N.
    """

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[dict] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        mask = batch["attention_mask"]
        self.batches.append({"rows": len(examples), "tokens": int(mask.sum()), "padded": int(mask.numel())})
        return batch


def steady(step_ends: list[float]) -> tuple[float, int]:
    """(seconds, steps) of steps 2..N-1: from the end of step 1 to the end of step N-1.

    The first step carries one-off warm-up costs, and on the instruct side the last step's metrics row is
    written after the end-of-run evaluation, so both are left out on both sides.
    """
    if len(step_ends) < 3:
        return float("nan"), 0
    return step_ends[-2] - step_ends[0], len(step_ends) - 2


def median_step(step_ends: list[float]) -> float:
    """Median seconds of steps 2..N-1."""
    gaps = [b - a for a, b in zip(step_ends[:-2], step_ends[1:-1])]
    return statistics.median(gaps) if gaps else float("nan")


def instruct_step_ends(run: Path) -> list[float]:
    """Per-step `time` of an instruct run's metrics.jsonl (seconds since the run folder was opened)."""
    rows = read_jsonl(run / "metrics.jsonl")
    return [row["time"] for row in sorted(rows, key=lambda r: r["step"])]


def summarise(result: dict) -> dict:
    """A side's numbers from its step end times and per-step batches ({rows, tokens, padded} per step).

    rows_per_s / tokens_per_s: steps 2..N-1 (see `steady`); median_step_*: the median over those steps of each
    step's own rate (robust to a slow spell of the machine); loop_rows_per_s: all N steps, over the loop time
    (TRL: on_train_begin to the end of step N; instruct: its own final tokens/s counter, converted with the
    recomputed token count); padding: share of batch positions that were padding, over all N steps;
    positions_per_s: batch positions, padding included, per second over steps 2..N-1 (raw compute speed).
    """
    nan = float("nan")
    ends, batches = result.get("step_ends") or [], result.get("batches")
    seconds, steps = steady(ends)
    out = {
        "steps": len(ends) or None,
        "median_step_s": median_step(ends),
        "rows_per_s": nan,
        "tokens_per_s": nan,
        "padding": nan,
        "tokens_per_step": nan,
        "loop_rows_per_s": nan,
        "loop_tokens_per_s": result.get("loop_tokens_per_s", nan),
        "median_step_tokens_per_s": nan,
        "median_step_rows_per_s": nan,
        "positions_per_s": nan,
    }
    if batches and steps:
        middle = batches[1 : len(ends) - 1]
        gaps = [b - a for a, b in zip(ends[:-2], ends[1:-1])]
        out["median_step_tokens_per_s"] = statistics.median(b["tokens"] / g for b, g in zip(middle, gaps))
        out["median_step_rows_per_s"] = statistics.median(b["rows"] / g for b, g in zip(middle, gaps))
        out["rows_per_s"] = sum(b["rows"] for b in middle) / seconds
        out["tokens_per_s"] = sum(b["tokens"] for b in middle) / seconds
        filled = sum(b.get("filled", b["tokens"]) for b in batches)  # packed rows hold fewer positions than tokens
        out["padding"] = 100 * (1 - filled / sum(b["padded"] for b in batches))
        out["tokens_per_step"] = sum(b["tokens"] for b in batches) / len(batches)
        out["positions_per_s"] = sum(b["padded"] for b in middle) / seconds
        loop_s = result.get("loop_s")
        if loop_s is None and out["loop_tokens_per_s"] == out["loop_tokens_per_s"]:  # instruct: from its counter
            loop_s = sum(b["tokens"] for b in batches) / out["loop_tokens_per_s"]
        if loop_s:
            out["loop_rows_per_s"] = sum(b["rows"] for b in batches) / loop_s
    return out


def best_run(results: list[dict], key: str) -> dict:
    """Of repeated runs of one side, the fastest by `key` of its summary (noise on a shared machine only
    ever slows a run down)."""
    ok = [r for r in results if r["rc"] == 0 and summarise(r)[key] == summarise(r)[key]]
    return max(ok, key=lambda r: summarise(r)[key]) if ok else results[-1]
