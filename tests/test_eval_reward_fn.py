"""eval judged by reward functions (--reward-fn): the Wilson interval against hand values; per-model accuracy and
mean that match a hand count over samples.jsonl, with and without a reward model, on generated answers and on a
--generations file (columns from --data, or carried in a report's samples.jsonl); bad specs are one-paragraph
errors."""

import json
import math
from functools import partial

import pytest

from instruct_cli.core import artifacts
from instruct_cli.steps import evaluate
from tests import cli_helpers
from tests.cli_helpers import invoke

fails = partial(cli_helpers.fails, user_traceback=True)  # a raising reward function's traceback is shown

WORDS = "red blue green cat dog sun tree water stone bird fish rain hill road book lamp".split()
TRL_FUNCTION = '''
def says_word(prompts, completions, word, **kwargs):
    """TRL's signature: 1.0 when the completion has the first letter of the row's `word`, None for a row
    without one."""
    return [None if w is None else float(w[0] in c[0]["content"]) for c, w in zip(completions, word)]
'''


def read_samples(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_wilson_interval_matches_hand_values():
    # 5 of 10: p = 0.5, z = 1.95996; centre (0.5 + z²/20) / (1 + z²/10) = 0.5, half-width 0.26341
    assert evaluate.wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)  # not empty at 0
    assert evaluate.wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert evaluate.wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-6)
    assert evaluate.wilson_interval(81, 263) == pytest.approx((0.255289, 0.366210), abs=1e-6)
    low, high = evaluate.wilson_interval(45, 100, level=0.9)  # z = 1.64485: narrower than at 95%
    assert high - low < evaluate.wilson_interval(45, 100)[1] - evaluate.wilson_interval(45, 100)[0]
    assert all(math.isnan(v) for v in evaluate.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        evaluate.wilson_interval(11, 10)


# ------------------------------------------------------------------------------------------ the fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sft_rm):
    """A prompts folder whose rows have an `answer` (a number) and a `word` column (None on every 5th row), and a
    file with a TRL-style reward function that reads the `word` column."""
    root = tmp_path_factory.mktemp("eval-reward-fn")
    rows = []
    for i in range(40):
        prompt = f"{WORDS[i % 16]} {WORDS[(3 * i + 1) % 16]} {WORDS[(5 * i + 2) % 16]} {i}?"
        rows.append({"prompt": prompt, "answer": i + 1, "word": None if i % 5 == 0 else WORDS[(7 * i) % 16]})
    raw = root / "math.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = root / "data"
    model = tiny_sft_rm["model"]
    invoke("prepare-data", "-i", raw, "-o", data, "--task", "prompts", "--model", model, "--eval-fraction", 0.5)
    functions = root / "rewards.py"
    functions.write_text(TRL_FUNCTION)
    eval_rows = [json.loads(line) for line in (data / "prompts.eval.jsonl").read_text().splitlines()]
    assert len(eval_rows) >= 4 and all("answer" in row and "word" in row for row in eval_rows)
    return {**tiny_sft_rm, "root": root, "data-math": data, "functions": functions, "eval_rows": eval_rows}


COMMON = ["--quantization", "none", "--max-new-tokens", 8, "--bootstrap", 200]


def check_figures(figure, values):
    """A model's figures of one function against the values of its responses read from samples.jsonl."""
    judged = [v for v in values if v is not None]
    assert figure["judged"] == len(judged) and figure["of"] == len(values)
    assert figure["mean"] == pytest.approx(sum(judged) / len(judged))
    correct = sum(1 for v in judged if v == 1.0)
    accuracy = figure["accuracy"]
    assert accuracy["correct"] == correct and accuracy["rate"] == pytest.approx(correct / len(judged))
    assert (accuracy["low"], accuracy["high"]) == pytest.approx(evaluate.wilson_interval(correct, len(judged)))
    assert accuracy["low"] <= accuracy["rate"] <= accuracy["high"]


# ------------------------------------------------------------------------------- without a reward model
def test_eval_with_reward_functions_only(setup, tmp_path):
    """No --reward: a TRL-style function reading a column and a ready-made checker judge every answer; the
    reward is their weighted sum minus the missing-EOS penalty, and win-rates compare it."""
    sft, out = str(setup["sft"]), tmp_path / "report"
    spec = f"{setup['functions']}:says_word"
    result = invoke(
        "eval",
        "--models",
        f"{sft},base",
        "--baseline",
        "base",
        "--reward-fn",
        spec,
        "--reward-fn",
        "final_number",
        "--reward-fn-weight",
        "1,0.5",
        "--data",
        setup["data-math"],
        "--out",
        out,
        *COMMON,
    )
    report = json.loads((out / "report.json").read_text())
    samples = read_samples(out)
    assert report["reward_model"] is None and report["reward_source"] == "reward functions"
    assert report["reward_functions"] == [
        {"name": "says_word", "spec": spec, "weight": 1.0},
        {"name": "final_number", "spec": "final_number", "weight": 0.5},
    ]
    eval_rows = setup["eval_rows"]
    assert report["prompts"] == len(samples) == len(eval_rows)
    # the columns travel with the prompts, in order: each sample has its own row's answer and word
    for sample, row in zip(samples, eval_rows):
        assert sample["prompt"] == row["prompt"]
        assert sample["columns"] == {"answer": row["answer"], "word": row["word"]}
    by_name = {model["name"]: model for model in report["models"]}
    for name in (sft, "base"):
        answers = [row["responses"][name] for row in samples]
        words = [answer["reward_fn"]["says_word"] for answer in answers]
        numbers = [answer["reward_fn"]["final_number"] for answer in answers]
        # by hand: the function's value of each answer, and None exactly where the row has no word
        for answer, row, value in zip(answers, eval_rows, words):
            expected = None if row["word"] is None else float(row["word"][0] in answer["text"])
            assert value == expected
        figures = by_name[name]["reward_functions"]
        check_figures(figures["says_word"], words)
        check_figures(figures["final_number"], numbers)
        assert figures["final_number"]["judged"] == len(samples)  # every row has a numeric answer
        # the reward is the weighted sum (a function that did not judge adds nothing) minus the EOS penalty
        for answer, word, number in zip(answers, words, numbers):
            expected = (word or 0.0) + 0.5 * number - (1.0 if answer["eos"] is False else 0.0)
            assert answer["reward"] == pytest.approx(expected)
        assert by_name[name]["reward"]["mean"] == pytest.approx(sum(a["reward"] for a in answers) / len(answers))
    # the sft run against the baseline: a paired difference over the prompts both were judged on
    versus = by_name[sft]["reward_functions"]["says_word"]["vs_baseline"]
    pairs = [
        (row["responses"][sft]["reward_fn"]["says_word"], row["responses"]["base"]["reward_fn"]["says_word"])
        for row in samples
        if row["columns"]["word"] is not None
    ]
    assert versus["against"] == "base" and versus["prompts"] == len(pairs)
    assert versus["difference"] == pytest.approx(sum(a - b for a, b in pairs) / len(pairs))
    assert versus["low"] <= versus["difference"] <= versus["high"]
    assert by_name["base"]["reward_functions"]["says_word"]["vs_baseline"] is None
    win = by_name[sft]["win_rate"]
    assert win["wins"] + win["ties"] + win["losses"] == len(samples) and win["low"] <= win["rate"] <= win["high"]
    # the manifest's metrics, the parents (the function's file by content), the words of the report
    manifest = artifacts.require_complete(out, "report")
    accuracy = by_name[sft]["reward_functions"]["says_word"]["accuracy"]
    assert manifest["metrics"][f"{sft}/reward_fn/says_word/accuracy"] == accuracy["rate"]
    assert manifest["metrics"][f"{sft}/reward_fn/says_word/accuracy_low"] == accuracy["low"]
    assert manifest["parents"][f"reward_fn:{spec}"]["sha256"] == artifacts.sha256_file(setup["functions"])
    assert "reward" not in manifest["parents"]
    markdown = (out / "report.md").read_text()
    assert "### Reward functions" in markdown and "| model | function | mean | judged |" in markdown
    figure = by_name[sft]["reward_functions"]["says_word"]
    cell = f"{100 * accuracy['rate']:.0f}% ({100 * accuracy['low']:.0f}-{100 * accuracy['high']:.0f}%)"
    assert f"| {sft} | says_word | {figure['mean']:.3g} | {figure['judged']}/{len(samples)} | {cell} |" in markdown
    assert "No reward model: the reward is the reward functions' weighted sum" in markdown
    assert "by the reward functions" in report["verdict"][0]
    assert any(line.startswith(f"By says_word, {sft} is right on") for line in report["verdict"])
    terminal = " ".join(result.output.split())
    assert "reward functions (accuracy: Wilson 95% CI)" in terminal
    assert "By says_word," in terminal and "is right on" in terminal
    assert 'id="reward-functions"' in (out / "report.html").read_text()


# ---------------------------------------------------------------------- with a reward model, from a file
def test_generations_are_judged_by_functions_next_to_the_reward_model(setup, tmp_path):
    """Hand-written answers (--generations) with known right and wrong numbers: exact accuracies and
    intervals; the reward model still gives the reward; a report's samples.jsonl carries the columns, so
    scoring it again needs no --data."""
    sft, rows = str(setup["sft"]), setup["eval_rows"]
    right = {sft: set(range(0, len(rows), 2)) | {1}, "base": set(range(0, len(rows), 4))}
    answers = tmp_path / "answers.jsonl"
    with open(answers, "w") as handle:
        for index, row in enumerate(rows):
            for name in (sft, "base"):
                number = row["answer"] if index in right[name] else row["answer"] + 1
                handle.write(json.dumps({"prompt": row["prompt"], "response": f"It is {number}.", "model": name}))
                handle.write("\n")
    out = tmp_path / "rescored"
    flags = ["--models", f"{sft},base", "--reward", setup["rm"], "--reward-fn", "final_number", *COMMON]
    invoke("eval", *flags, "--generations", answers, "--data", setup["data-math"], "--out", out)
    report = json.loads((out / "report.json").read_text())
    assert report["reward_source"] == "reward model" and report["reward_model"]["path"] == str(setup["rm"])
    by_name = {model["name"]: model for model in report["models"]}
    for name in (sft, "base"):
        figure = by_name[name]["reward_functions"]["final_number"]
        correct = len(right[name])
        assert figure["judged"] == len(rows) and figure["mean"] == pytest.approx(correct / len(rows))
        assert figure["accuracy"]["correct"] == correct
        assert (figure["accuracy"]["low"], figure["accuracy"]["high"]) == evaluate.wilson_interval(correct, len(rows))
    versus = by_name[sft]["reward_functions"]["final_number"]["vs_baseline"]  # baseline: the first model
    assert report["baseline"] == sft and versus is None
    versus = by_name["base"]["reward_functions"]["final_number"]["vs_baseline"]
    assert versus["difference"] == pytest.approx((len(right["base"]) - len(right[sft])) / len(rows))
    samples = read_samples(out)
    assert [row["columns"]["answer"] for row in samples] == [row["answer"] for row in rows]
    # the reward is still the reward model's: the same as without the function
    plain = tmp_path / "plain"
    invoke("eval", *flags[:4], *COMMON, "--generations", answers, "--out", plain)
    assert [r["responses"][sft]["reward"] for r in samples] == pytest.approx(
        [r["responses"][sft]["reward"] for r in read_samples(plain)], abs=1e-5
    )
    assert "reward_fn" not in read_samples(plain)[0]["responses"][sft]
    assert json.loads((plain / "report.json").read_text())["models"][0]["reward_functions"] == {}
    # samples.jsonl read back: the columns come with its rows, the figures are the same
    again = tmp_path / "again"
    invoke("eval", *flags, "--generations", out / "samples.jsonl", "--out", again)
    again_report = json.loads((again / "report.json").read_text())
    for first, second in zip(report["models"], again_report["models"]):
        assert (
            second["reward_functions"]["final_number"]["accuracy"]
            == first["reward_functions"]["final_number"]["accuracy"]
        )
    # --compare shows each function's figures side by side
    differences = evaluate.compare([out, again])
    assert any(row[:2] == [sft, "final_number accuracy"] and row[4] == "+0.0%" for row in differences["metrics"])


# ------------------------------------------------------------------------------------------ bad input
def test_bad_reward_function_specs_are_one_paragraph_errors(setup, tmp_path):
    sft, data = str(setup["sft"]), setup["data-math"]
    out = tmp_path / "x"
    common = ["eval", "--models", sft, "--data", data, "--quantization", "none", "--out", out]
    message = fails(*common)
    assert "No reward model or reward function given" in message and "--reward-fn" in message
    assert "does not exist" in fails(*common, "--reward-fn", tmp_path / "missing.py:f")
    assert "is not FILE.py:FUNCTION" in fails(*common, "--reward-fn", "no_such_checker")
    assert "has no function 'nope'" in fails(*common, "--reward-fn", f"{setup['functions']}:nope")
    assert "1 reward functions and 2 weights" in fails(
        *common, "--reward-fn", "final_number", "--reward-fn-weight", "1,2"
    )
    assert not out.exists()  # a bad spec is found before the report folder is opened
    # a function that fails on one answer: the error names the function, the sample and the user's line
    broken = tmp_path / "broken.py"
    broken.write_text("def picky(prompts, responses):\n    return [1 / len(r.split('7')[1]) for r in responses]\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"prompt": row["prompt"], "response": f"It is {row['answer']}", "model": sft}) + "\n"
            for row in setup["eval_rows"]
        )
    )
    message = fails(
        "eval", "--models", sft, "--reward-fn", f"{broken}:picky", "--generations", answers, "--quantization", "none",
        "--out", tmp_path / "y",
    )  # fmt: skip
    assert "raised" in message and "on the sample" in message and "broken.py" in message
