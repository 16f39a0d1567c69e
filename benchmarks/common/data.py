"""The synthetic data of bench_sft/bench_rm (random words of `instruct_cli.core.tiny`'s corpus, deterministic
in the seed, no network): short single-turn rows, or real-shaped ones with prompts and answers of realistic
token lengths; JSONL files; and the data folder both sides train on (`instruct prepare-data`)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

from .paths import INSTRUCT


def _words() -> list[str]:
    from instruct_cli.core.tiny import _CORPUS

    return sorted(set(re.findall(r"[A-Za-z]+", _CORPUS)))


def _sentence(rng: random.Random, words: list[str], low: int, high: int) -> str:
    text = " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!"])


def sft_rows(n: int, seed: int, model: Path | None = None) -> list[dict]:
    """`n` single-turn conversations of random words with varying lengths (a third with a system message).

    Single-turn, so "loss on the assistant turn" (instruct) and "loss on the completion" (TRL) are the same
    tokens; typical lengths with the tiny tokenizer: 30-450 tokens.
    """
    rng, words = random.Random(seed), _words()
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": _sentence(rng, words, 3, 10)})
        messages.append({"role": "user", "content": _sentence(rng, words, 4, 40)})
        messages.append({"role": "assistant", "content": _sentence(rng, words, 6, 130)})
        rows.append({"messages": messages})
    return rows


def preference_rows(n: int, seed: int, model: Path | None = None) -> list[dict]:
    """`n` rows of {prompt, chosen, rejected} text with varying lengths (chosen and rejected differ)."""
    rng, words = random.Random(seed), _words()
    rows = []
    for _ in range(n):
        rows.append(
            {
                "prompt": _sentence(rng, words, 4, 40),
                "chosen": _sentence(rng, words, 6, 100),
                "rejected": _sentence(rng, words, 6, 100),
            }
        )
    return rows


REAL_SHAPE = {"prompt": (100, 400), "response": (30, 200)}
"""Token lengths (uniform in these ranges) of the real-shaped preference data: real preference prompts are
often longer than their responses (multi-turn ones especially)."""

LONG_SHAPE = {"prompt": (150, 900), "response": (100, 600)}
"""Token lengths of the long-row data (`--data-shape long`), like public ShareGPT-style preference sets: most
rows exceed 256 tokens and many exceed 1024, in the prompt, the answers or both, so --max-length cuts them."""


def tokens_per_word(model: Path) -> float:
    """How many tokens one random word of the corpus takes with `model`'s tokenizer (with its space)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rng, words = random.Random(0), _words()
    sample = " ".join(rng.choice(words) for _ in range(2000))
    return len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000


def _real_shaped(seed: int, model: Path, shape: dict):
    """(rng, text(tokens) -> random-word text of about that many tokens of `model`'s tokenizer, prompt() -> a
    realistic prompt as messages, its length drawn from `shape`): the generator the real-shaped and long data
    sets share."""
    rng, words, ratio = random.Random(seed), _words(), tokens_per_word(model)

    def text(tokens: int) -> str:
        count = max(1, round(tokens / ratio))
        body = " ".join(rng.choice(words) for _ in range(count))
        return body[0].upper() + body[1:] + "."

    def prompt() -> list[dict]:
        budget = rng.randint(*shape["prompt"])
        messages = []
        if rng.random() < 1 / 4:
            system = rng.randint(10, 30)
            messages.append({"role": "system", "content": text(system)})
            budget = max(40, budget - system)
        if rng.random() < 1 / 3:
            first, answer = round(budget * 0.4), round(budget * 0.3)
            messages += [
                {"role": "user", "content": text(first)},
                {"role": "assistant", "content": text(answer)},
                {"role": "user", "content": text(budget - first - answer)},
            ]
        else:
            messages.append({"role": "user", "content": text(budget)})
        return messages

    return rng, text, prompt


def real_preference_rows(n: int, seed: int, model: Path, shape: dict = REAL_SHAPE) -> list[dict]:
    """`n` preference rows with realistic shapes: prompts of 100-400 tokens (of `model`'s tokenizer, before
    the chat template), responses of 30-200 (or the lengths of `shape`); a third of the prompts are
    multi-turn (user, assistant, user), a quarter have a system message. Random words, deterministic in
    `seed`; no network."""
    rng, text, prompt = _real_shaped(seed, model, shape)
    rows = []
    for _ in range(n):
        messages = prompt()
        chosen, rejected = (text(rng.randint(*shape["response"])) for _ in range(2))
        rows.append({"prompt": messages, "chosen": chosen, "rejected": rejected})
    return rows


def long_preference_rows(n: int, seed: int, model: Path) -> list[dict]:
    """`real_preference_rows` of LONG_SHAPE: rows longer than the usual --max-length."""
    return real_preference_rows(n, seed, model, LONG_SHAPE)


def real_sft_rows(n: int, seed: int, model: Path, shape: dict = REAL_SHAPE) -> list[dict]:
    """`n` conversations with the shapes of `real_preference_rows` (the same prompts), each ending in one
    assistant answer of 30-200 tokens. The multi-turn third has an earlier assistant turn too: instruct
    learns it as well, TRL (loss on the completion) only the last; tokens/s counts every non-pad token alike.
    `shape` changes the lengths (LONG_SHAPE: `long_sft_rows`)."""
    rng, text, prompt = _real_shaped(seed, model, shape)
    rows = []
    for _ in range(n):
        messages = prompt() + [{"role": "assistant", "content": text(rng.randint(*shape["response"]))}]
        rows.append({"messages": messages})
    return rows


def long_sft_rows(n: int, seed: int, model: Path) -> list[dict]:
    """`real_sft_rows` of LONG_SHAPE: conversations longer than the usual --max-length."""
    return real_sft_rows(n, seed, model, LONG_SHAPE)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare_data(raw: Path, out: Path, task: str, model: Path, env: dict) -> Path:
    """`instruct prepare-data` (the CLI, as a subprocess); the data folder both sides train on."""
    cmd = [
        INSTRUCT,
        "prepare-data",
        "-i",
        str(raw),
        "-o",
        str(out),
        "--task",
        task,
        "--model",
        str(model),
        "--eval-fraction",
        "0.05",
        "--force",
    ]
    print("[bench] $ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"[bench] prepare-data failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return out
