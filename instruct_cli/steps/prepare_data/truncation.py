"""`prepare-data --truncate`: an over-long row kept by cutting its prompt from the left, never its answers.

A row is split into its prompt (the messages before the answer) and its answers (sft: the last assistant turn;
prefs: every response; prompts: none). Whole messages go from the start of the prompt first, oldest first (a
leading system message stays while it fits); then the text of the oldest message left is cut from its start,
token by token, until every answer fits within --max-tokens under the chat template. A row whose answers do not
fit even beside a one-token prompt is not cut: prepare-data drops it and counts it.
"""

from __future__ import annotations

from instruct_cli.core.chat import template_ids


def prompt_and_answers(row: dict, task: str) -> tuple[list[dict], list[list[dict]]]:
    """(prompt messages, answers as message lists) of a canonical row; a prompts row has no answers."""
    if task == "sft":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], [messages[last:]]
    if task == "prompts":
        return row["prompt"], []
    return row["prompt"], [row["chosen"], row["rejected"]] if "chosen" in row else row["responses"]


def with_prompt(row: dict, task: str, prompt: list[dict]) -> dict:
    """The row with its prompt replaced (sft: the messages before its last answer)."""
    if task == "sft":
        _, [answer] = prompt_and_answers(row, task)
        return {**row, "messages": prompt + answer}
    return {**row, "prompt": prompt}


def longest(tokenizer, prompt: list[dict], answers: list[list[dict]]) -> int:
    """Tokens of the longest conversation the row renders to (prompt + each answer, or the prompt alone)."""
    return max(len(template_ids(tokenizer, prompt + answer)) for answer in answers or [[]])


def cut_prompt(tokenizer, row: dict, task: str, max_tokens: int) -> dict | None:
    """The row with its prompt cut from the left so that it fits `max_tokens`, or None when no cut of the prompt
    (down to one token of text) makes it fit."""
    prompt, answers = prompt_and_answers(row, task)
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    turns = prompt[len(system) :]
    # 1. whole messages, oldest first: the system message goes last
    for head in (system, []) if system else ([],):
        for start in range(len(turns)):
            kept = head + turns[start:]
            if longest(tokenizer, kept, answers) <= max_tokens:
                return with_prompt(row, task, kept)
    if not turns:
        return None
    # 2. the text of the last prompt message, cut from its start (the fewest tokens dropped that fit)
    last = turns[-1]
    ids = tokenizer(last["content"], add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in ids["offset_mapping"]]

    def cut_at(drop: int) -> list[dict]:
        return [{**last, "content": last["content"][starts[drop] :]}]

    low, high = 1, len(starts) - 1  # drop at least one token, keep at least one
    if high < low or longest(tokenizer, cut_at(high), answers) > max_tokens:
        return None
    while low < high:  # the smallest drop that fits
        middle = (low + high) // 2
        if longest(tokenizer, cut_at(middle), answers) <= max_tokens:
            high = middle
        else:
            low = middle + 1
    return with_prompt(row, task, cut_at(low))
