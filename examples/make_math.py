"""Write the arithmetic word problems of examples/data/math/: a task whose answers a rule can check.

Every problem is one or two steps of small-number arithmetic in a short story ("Mia has 7 pencils. She buys
5 more. How many pencils does she have now?"), with its answer as a number in the `answer` column, so
`--reward-fn final_number` can score a response by the last number it writes. Nothing is downloaded; the
files are deterministic in the seed.

- problems.jsonl:  {"prompt", "answer"} rows: what GRPO practises on and eval judges (prepare-data holds out
  an eval split of them);
- solutions.jsonl: other problems of the same kinds, each with a worked solution that ends in "The answer
  is N." (OpenAI `messages`), for the optional short sft that teaches the answer format.

Run `python examples/make_math.py` to rewrite the files (`--help` for the sizes, the seed and the range of
the numbers).
"""

import argparse
import json
import random
from pathlib import Path

NAMES = [("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Ben", "He"),
         ("Ivy", "She"), ("Max", "He"), ("Eva", "She"), ("Tom", "He"), ("Lily", "She"), ("Noah", "He")]  # fmt: skip
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells", "coins", "stamps"]
INSTRUCTION = "Solve the problem and end with: The answer is <number>."


def one_step(rng: random.Random, top: int) -> tuple[str, str, int]:
    """(problem, worked solution, answer) of one addition, subtraction or multiplication."""
    (name, pronoun), thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "subtract", "multiply"])
    if kind == "add":
        a, b = rng.randint(2, top), rng.randint(2, top)
        problem = f"{name} has {a} {thing}. {pronoun} gets {b} more. How many {thing} does {name} have now?"
        return problem, f"{name} has {a} and gets {b} more, so {a} + {b} = {a + b}.", a + b
    if kind == "subtract":
        a = rng.randint(4, top + 2)
        b = rng.randint(1, a - 1)
        problem = f"{name} had {a} {thing} and gave {b} away. How many {thing} does {name} have left?"
        return problem, f"{name} had {a} and gave {b} away, so {a} - {b} = {a - b}.", a - b
    a, b = rng.randint(2, max(2, top // 2)), rng.randint(2, 5)
    problem = f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} does {name} buy?"
    return problem, f"{a} boxes of {b} {thing} each make {a} x {b} = {a * b}.", a * b


def two_step(rng: random.Random, top: int) -> tuple[str, str, int]:
    """(problem, worked solution, answer) of an addition followed by a subtraction."""
    (name, pronoun), thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, top), rng.randint(2, top)
    c = rng.randint(1, a + b - 1)
    problem = (
        f"{name} has {a} {thing}. {pronoun} finds {b} more and then gives {c} to a friend. "
        f"How many {thing} does {name} have now?"
    )
    solution = f"{name} has {a} + {b} = {a + b}, then gives {c} away: {a + b} - {c} = {a + b - c}."
    return problem, solution, a + b - c


def problem(rng: random.Random, top: int, two_step_share: float) -> tuple[str, str, int]:
    """One problem of either kind."""
    return two_step(rng, top) if rng.random() < two_step_share else one_step(rng, top)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "math")
    parser.add_argument("--problems", type=int, default=600, help="rows of problems.jsonl")
    parser.add_argument("--solutions", type=int, default=200, help="rows of solutions.jsonl")
    parser.add_argument("--top", type=int, default=20, help="largest number in a problem")
    parser.add_argument("--two-step-share", type=float, default=0.3, help="share of two-step problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()

    def fresh() -> tuple[str, str, int]:  # no problem twice, across both files
        while True:
            text, solution, answer = problem(rng, args.top, args.two_step_share)
            if text not in seen:
                seen.add(text)
                return text, solution, answer

    problems = []
    for _ in range(args.problems):
        text, _, answer = fresh()
        problems.append({"prompt": f"{text} {INSTRUCTION}", "answer": answer})
    solutions = []
    for _ in range(args.solutions):
        text, solution, answer = fresh()
        solutions.append(
            {
                "messages": [
                    {"role": "user", "content": f"{text} {INSTRUCTION}"},
                    {"role": "assistant", "content": f"{solution} The answer is {answer}."},
                ]
            }
        )
    write_jsonl(args.out / "problems.jsonl", problems)
    write_jsonl(args.out / "solutions.jsonl", solutions)
    print(f"wrote {len(problems)} problems and {len(solutions)} worked solutions to {args.out}")


if __name__ == "__main__":
    main()
