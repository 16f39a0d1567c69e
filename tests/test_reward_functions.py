"""Reward functions: TRL's signature with the data's columns, the two-argument form, several functions with
weights, None for a sample a function does not judge, per-function statistics, and the ready-made checkers."""

import math

import pytest

from instruct_cli.core import checkers, reward_functions
from instruct_cli.core.errors import UserError

PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "And 10 - 4?"}]]
RESPONSES = ["It is 5.", "I think 7"]
COLUMNS = [{"answer": "#### 5", "level": 1}, {"answer": 6, "level": 2}]

TRL_STYLE = '''
def correct(prompts, completions, answer, **kwargs):
    """As a TRL user writes it: completions are message lists, `answer` a column of the dataset."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if str(a).split("#")[-1].strip() in c else 0.0 for c, a in zip(contents, answer)]


def only_level_one(prompts, completions, level, **kwargs):
    return [0.5 if value == 1 else None for value in level]


def seen(prompts, completions, **kwargs):
    return [float(len(kwargs)) for _ in completions]
'''


@pytest.fixture
def rewards_file(tmp_path):
    file = tmp_path / "trl_rewards.py"
    file.write_text(TRL_STYLE)
    return file


def test_an_unmodified_trl_reward_function_reads_the_columns(rewards_file):
    function = reward_functions.load(f"{rewards_file}:correct")
    assert function.trl_style
    assert function.scores(PROMPTS, RESPONSES, COLUMNS) == [1.0, 0.0]
    # the columns arrive as keyword lists, one value per sample: here `answer` and `level`
    assert reward_functions.load(f"{rewards_file}:seen").scores(PROMPTS, RESPONSES, COLUMNS) == [2.0, 2.0]


def test_none_is_not_judged_and_the_weighted_sum_skips_it(rewards_file):
    combined = reward_functions.load_all([f"{rewards_file}:correct", f"{rewards_file}:only_level_one"], [1.0, 2.0])
    totals, stats = combined.scores(PROMPTS, RESPONSES, COLUMNS)
    assert totals == [1.0 + 2 * 0.5, 0.0]  # the second sample: 0 from `correct`, nothing from the other
    assert stats["reward_fn/correct/mean"] == 0.5 and stats["reward_fn/correct/std"] == pytest.approx(math.sqrt(0.5))
    assert stats["reward_fn/only_level_one/mean"] == 0.5 and stats["reward_fn/only_level_one/std"] == 0.0
    one_weight = reward_functions.load_all([f"{rewards_file}:correct", f"{rewards_file}:only_level_one"], [0.5])
    assert one_weight.weights == [0.5, 0.5]
    with pytest.raises(UserError, match="2 reward functions and 3 weights"):
        reward_functions.load_all([f"{rewards_file}:correct", f"{rewards_file}:seen"], [1.0, 1.0, 1.0])


def test_a_failing_trl_function_names_the_sample(tmp_path):
    file = tmp_path / "picky.py"
    file.write_text("def picky(prompts, completions, answer, **kwargs):\n    return [1 / int(a) for a in answer]\n")
    with pytest.raises(UserError) as caught:
        reward_functions.load(f"{file}:picky").scores(PROMPTS, RESPONSES, [{"answer": 3}, {"answer": 0}])
    message = caught.value.paragraph()
    assert "ZeroDivisionError" in message and "And 10 - 4?" in message and "I think 7" in message


def test_checkers_by_name():
    completions = [[{"role": "assistant", "content": text}] for text in ("so 1,234 apples", "maybe 12", "none")]
    assert checkers.final_number(None, completions, answer=["He has #### 1234", 13, None]) == [1.0, 0.0, None]
    function = reward_functions.load("final_number")
    assert function.scores(PROMPTS, RESPONSES, COLUMNS) == [1.0, 0.0]
    tagged = ["<answer>5</answer>", "5"]
    assert reward_functions.load("answer_in_tags").scores(PROMPTS, tagged) == [1.0, 0.0]
    with pytest.raises(UserError, match="ready-made checker: final_number"):
        reward_functions.load("final_numbers")


def test_math_answer_compares_with_math_verify():
    pytest.importorskip("math_verify")
    function = reward_functions.load("math_answer")
    got = function.scores(PROMPTS, ["$\\frac{1}{2}$", "0.3"], [{"solution": "$0.5$"}, {"solution": "$\\frac{1}{3}$"}])
    assert got == [1.0, 0.0]


ALIGNED = '''
def aligned(prompts, completions, answer, **kwargs):
    """1.0 when the `answer` column is the length of its own prompt's text: the columns reached the function
    with their prompts, through the K samples per prompt of a group."""
    return [1.0 if len(prompt[-1]["content"]) == a else 0.0 for prompt, a in zip(prompts, answer)]
'''


def test_a_trl_function_gets_each_prompts_own_columns_in_a_ppo_run(tiny_sft_rm, tiny_model_dir, tmp_path):
    """prepare-data keeps the `answer` column, ppo hands it to an unmodified TRL-style function with its own
    prompt (K = 4 responses per prompt), and the function's mean is logged per iteration."""
    import json

    from instruct_cli.steps import ppo
    from tests.test_data import prepare
    from tests.test_ppo import ppo_config

    texts = [f"what is {n} plus {n}?" * (1 + n % 3) for n in range(24)]
    result, prompts = prepare(
        tmp_path, tiny_model_dir, "p.jsonl", [{"prompt": t, "answer": len(t)} for t in texts], "--task", "prompts"
    )
    assert result.exit_code == 0, result.output
    file = tmp_path / "aligned.py"
    file.write_text(ALIGNED)
    pipeline = {**tiny_sft_rm, "prompts": prompts}
    config = ppo_config(
        pipeline,
        tmp_path / "run",
        reward=None,
        reward_fn=[f"{file}:aligned"],
        advantage="grpo",
        iterations=2,
        missing_eos_penalty=0.0,
    )
    out = ppo.run(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["reward_fn/aligned/mean"] for row in rows] == [1.0, 1.0]
    assert rows[-1]["eval/reward"] == 1.0  # the held-out prompts get their own columns too
