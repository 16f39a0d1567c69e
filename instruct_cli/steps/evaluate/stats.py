"""The statistics of `instruct eval`: win/tie/loss outcomes, win-rate, its bootstrap interval, the Wilson interval
of an accuracy, distinct-n, the per-response KL sum and a summary of a list of values.

Pure functions of numbers and texts, tested against hand-computed values. Uses numpy, the standard library and
core/intervals.py (the Wilson interval, shared with rm and dpo), no models.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from instruct_cli.core.intervals import wilson_interval  # noqa: F401 - the report's intervals

TIE_TOLERANCE = 1e-6


def outcomes(rewards: Sequence[float], baseline_rewards: Sequence[float], tie: float = TIE_TOLERANCE) -> np.ndarray:
    """Per prompt: 1.0 when the model's reward beats the baseline's, 0.5 for a tie (equal within `tie`), else 0."""
    model, baseline = np.asarray(rewards, dtype=float), np.asarray(baseline_rewards, dtype=float)
    if model.shape != baseline.shape:
        raise ValueError(f"{len(model)} rewards against {len(baseline)} baseline rewards")
    return np.where(np.abs(model - baseline) <= tie, 0.5, (model > baseline).astype(float))


def win_rate(rewards: Sequence[float], baseline_rewards: Sequence[float], tie: float = TIE_TOLERANCE) -> float:
    """The share of prompts on which the model beats the baseline, ties counted as half."""
    return float(outcomes(rewards, baseline_rewards, tie).mean())


def bootstrap_interval(
    values: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values`.

    The values (one per prompt) are resampled with replacement `resamples` times with a seeded numpy
    generator; the interval is the (1 - level)/2 and (1 + level)/2 quantiles of the resampled means.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams, pooled over the texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (text.split() for text in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_kl(logprobs: Sequence[Sequence[float]], reference_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """Per response: the sum over its tokens of log p_model - log p_reference.

    Over responses sampled from the model, the mean of these sums is an unbiased estimate of
    KL(model || reference) per response, in nats (a single sum can be negative).
    """
    kls = []
    for own, reference in zip(logprobs, reference_logprobs, strict=True):
        if len(own) != len(reference):
            raise ValueError(f"a response of {len(own)} tokens has {len(reference)} reference log-probs")
        kls.append(math.fsum(a - b for a, b in zip(own, reference)))
    return kls


def describe(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and quartiles of `values`."""
    array = np.asarray(values, dtype=float)
    lowest, p25, median, p75, highest = np.percentile(array, [0, 25, 50, 75, 100])
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(lowest),
        "p25": float(p25),
        "median": float(median),
        "p75": float(p75),
        "max": float(highest),
        "n": int(len(array)),
    }


def length_controlled_win_rate(
    results: Sequence[float], length_differences: Sequence[float], ridge: float = 1e-3, iterations: int = 50
) -> float:
    """The win-rate with the length difference regressed out (AlpacaEval 2's length control, for one pair of
    models): fit P(win) = sigmoid(a + b * tanh(d / std(d))) to the per-prompt outcomes (ties as 0.5, soft
    labels) by Newton's method with a small ridge on b, and read it at equal length: sigmoid(a). It is an
    extrapolation when few prompts have answers of about equal length; the bootstrap interval shows it.

    `length_differences` are the model's response length minus the baseline's, per prompt. When the lengths
    do not differ at all there is nothing to regress out and the raw win-rate comes back."""
    y = np.asarray(results, dtype=float)
    d = np.asarray(length_differences, dtype=float)
    if len(y) == 0:
        return math.nan
    spread = d.std()
    if spread == 0:
        return float(y.mean())
    x = np.stack([np.ones_like(d), np.tanh(d / spread)], axis=1)
    theta = np.zeros(2)
    penalty = np.diag([0.0, ridge * len(y)])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        gradient = x.T @ (p - y) + penalty @ theta
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-theta[0])))


def length_controlled_interval(
    results: Sequence[float],
    length_differences: Sequence[float],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `length_controlled_win_rate`, prompts resampled with replacement and the
    regression refitted each time (seeded, as `bootstrap_interval`)."""
    y, d = np.asarray(results, dtype=float), np.asarray(length_differences, dtype=float)
    if len(y) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    rates = [length_controlled_win_rate(y[rows], d[rows]) for rows in rng.integers(0, len(y), size=(resamples, len(y)))]
    low, high = np.percentile(rates, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def win_figures(
    rewards: Sequence[float],
    baseline_rewards: Sequence[float],
    differences: Sequence[float],
    resamples: int,
    seed: int,
    against: str,
) -> dict:
    """A win-rate against the baseline from two lists of rewards (one per prompt): the rate, its bootstrap 95%
    interval, wins/ties/losses, and the length-controlled rate with its interval (as the main win-rate)."""
    results = outcomes(rewards, baseline_rewards)
    low, high = bootstrap_interval(results, resamples, seed)
    lc_low, lc_high = length_controlled_interval(results, differences, resamples, seed)
    return {
        "against": against,
        "rate": float(results.mean()),
        "low": low,
        "high": high,
        "wins": int((results == 1.0).sum()),
        "ties": int((results == 0.5).sum()),
        "losses": int((results == 0.0).sum()),
        "length_controlled": {
            "rate": length_controlled_win_rate(results, differences),
            "low": lc_low,
            "high": lc_high,
            "method": "logistic regression of the outcome on tanh(length difference / its std), read at "
            "equal length (AlpacaEval 2's length control)",
        },
    }
