"""Confidence intervals every step can quote: the Wilson interval of an accuracy (eval's reward-function
accuracies, the eval accuracy of rm and dpo on small splits). Pure functions, tested on hand values.
May use: nothing.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: `successes` right out of `trials` (e.g. an accuracy).

    With p = successes / trials and z the standard normal quantile of (1 + level) / 2 (1.96 for 95%):
    (p + z²/2n ± z sqrt(p(1 - p)/n + z²/4n²)) / (1 + z²/n). Unlike p ± z sqrt(p(1 - p)/n) it stays within
    [0, 1] and is not empty at 0 or n successes (5/10 gives 0.237-0.763, 0/10 gives 0-0.278).
    """
    if trials <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends where rounding would leave 1e-17
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def accuracy_interval(accuracy: float, trials: int, name: str = "eval/accuracy") -> dict[str, float]:
    """`name`_low / _high, the Wilson 95% interval of an accuracy measured on `trials` items (prompts), and
    the count as `name`_n: what makes "accuracy 1" on a 2-pair eval split read as what it is. A per-prompt
    accuracy that is a fraction (a ranked prompt's share of right pairs) counts as its rounded share."""
    if trials <= 0 or math.isnan(accuracy):
        return {}
    low, high = wilson_interval(round(accuracy * trials), trials)
    return {f"{name}_low": low, f"{name}_high": high, f"{name}_n": trials}


def with_interval(metrics: dict, name: str = "eval/accuracy") -> object:
    """How a summary shows an accuracy: with its interval and count when `accuracy_interval` gave them
    ("0.75 (95% CI 0.41-0.93, 8 prompts)"), else the number alone."""
    value = metrics[name]
    if f"{name}_n" not in metrics:  # not an accuracy with an interval: the value as it is
        return value
    return f"{value:.4g} (95% CI {metrics[f'{name}_low']:.2f}-{metrics[f'{name}_high']:.2f}, {metrics[f'{name}_n']} prompts)"


def add_accuracy_interval(metrics: dict, trials: int, name: str = "eval/accuracy") -> None:
    """Add `accuracy_interval`'s figures to a training step's final metrics when they hold `name`."""
    if name in metrics:
        metrics.update(accuracy_interval(metrics[name], trials, name))
