"""examples/make_math.py: the arithmetic word problems of recipes/math.yaml are deterministic, answered by
their `answer` column, checkable by `final_number`, and the committed files are what the script writes."""

import json
import subprocess
import sys
from pathlib import Path

from instruct_cli.core import checkers

REPO = Path(__file__).resolve().parents[1]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_problems_are_checkable_and_the_committed_files_are_current(tmp_path):
    subprocess.run([sys.executable, str(REPO / "examples/make_math.py"), "--out", str(tmp_path)], check=True)
    problems, solutions = read(tmp_path / "problems.jsonl"), read(tmp_path / "solutions.jsonl")
    assert (len(problems), len(solutions)) == (600, 200)
    for name in ("problems.jsonl", "solutions.jsonl"):  # deterministic, and the repository holds this output
        assert (tmp_path / name).read_text() == (REPO / "examples/data/math" / name).read_text(), name
    # no problem is both practised on (GRPO) and demonstrated (sft)
    asked = {row["prompt"] for row in problems}
    assert not asked & {row["messages"][0]["content"] for row in solutions}
    assert len(asked) == len(problems)
    # each worked solution ends in its answer: final_number scores it 1, and 0 with the answer changed
    prompts = [row["messages"][:1] for row in solutions]
    answers = [int(row["messages"][1]["content"].rsplit(" ", 1)[1].rstrip(".")) for row in solutions]
    completions = [row["messages"][1:] for row in solutions]  # as TRL passes chat completions
    assert checkers.final_number(prompts, completions, answer=answers) == [1.0] * len(solutions)
    wrong = [a + 1 for a in answers]
    assert checkers.final_number(prompts, completions, answer=wrong) == [0.0] * len(solutions)
    assert all(isinstance(row["answer"], int) and row["answer"] >= 0 for row in problems)
