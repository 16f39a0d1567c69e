"""The length-controlled win-rate (eval's LC win-rate): on a planted case where a policy won only by getting
shorter, its interval covers 50% while the raw win-rate is far above; where quality and length are
independent, the two agree; the report says so in one sentence."""

import numpy as np
import pytest

from instruct_cli.steps.evaluate import report, stats


def planted(win_probability, seed=0, prompts=400):
    """Per-prompt outcomes and length differences (model minus baseline) of a policy that mostly got shorter."""
    rng = np.random.default_rng(seed)
    differences = rng.normal(-4.0, 6.0, prompts)
    wins = (rng.random(prompts) < win_probability(differences)).astype(float)
    return wins, differences


def test_a_lead_that_is_only_length_is_controlled_away():
    # the judge (a reward model that only likes short answers) prefers the shorter answer, whatever it says
    wins, differences = planted(lambda d: 1 / (1 + np.exp(d / 4)))
    raw_low, _ = stats.bootstrap_interval(wins, 500)
    low, high = stats.length_controlled_interval(wins, differences, 500)
    assert raw_low > 0.6
    assert low <= 0.5 <= high, (low, high)


def test_when_quality_does_not_depend_on_length_the_two_agree():
    wins, differences = planted(lambda d: np.full_like(d, 0.7))
    controlled = stats.length_controlled_win_rate(wins, differences)
    low, high = stats.length_controlled_interval(wins, differences, 500)
    assert controlled == pytest.approx(wins.mean(), abs=0.05)
    assert low > 0.5 and low <= wins.mean() <= high


def test_equal_lengths_give_the_raw_win_rate_and_ties_count_half():
    assert stats.length_controlled_win_rate([1.0, 0.5, 0.0, 1.0], [0, 0, 0, 0]) == 0.625
    # a regression on an exactly balanced design: wins at +d, losses at -d -> 50% at equal length
    assert stats.length_controlled_win_rate([1.0, 0.0] * 10, [3.0, -3.0] * 10) == pytest.approx(0.5, abs=1e-6)


def test_the_verdict_says_when_most_of_the_lead_is_length():
    raw = {"rate": 0.81, "low": 0.75, "high": 0.86}
    only_length = {**raw, "length_controlled": {"rate": 0.45, "low": 0.30, "high": 0.62}}
    [sentence] = report.length_sentence("ppo", only_length)
    assert "Most of that comes from length" in sentence and "45%" in sentence
    real = {**raw, "length_controlled": {"rate": 0.78, "low": 0.70, "high": 0.85}}
    assert report.length_sentence("ppo", real) == []
