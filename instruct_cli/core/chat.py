"""Chat messages as token ids: what every step shares about prompts, conversations and chat templates.

Owns: turning a prompt into messages (`to_messages`), rendering messages with the tokenizer's chat template
(`template_ids`, `encode_prompt`), and the SFT encoding whose labels mark the assistant tokens
(`encode_conversation`). May use: errors.
"""

from __future__ import annotations

from instruct_cli.core.errors import UserError


def to_messages(prompt, system: str | None = None) -> list[dict]:
    """A prompt (text or a message list) as chat messages, with `system` first if it has no system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt ending where the assistant's answer starts."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]


IGNORE = -100  # label value that cross_entropy skips


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template."""
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: labels equal the ids on assistant tokens (their EOS
    included) and IGNORE everywhere else (system, user, role headers, anything after an EOS).

    Each assistant turn is located by rendering the conversation up to it: its tokens start where the
    prompt with the generation header ends, and end at the EOS that closes the turn.
    """
    if not tokenizer.chat_template:
        raise UserError(
            "The model's tokenizer has no chat template, so turns cannot be told apart",
            where="--model",
            fix="Use an instruct/chat model, whose tokenizer has a chat template",
        )
    input_ids = template_ids(tokenizer, messages)
    labels = [IGNORE] * len(input_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(template_ids(tokenizer, messages[:turn], add_generation_prompt=True))
        through_turn = template_ids(tokenizer, messages[: turn + 1])
        if input_ids[: len(through_turn)] != through_turn or input_ids[:start] != template_ids(
            tokenizer, messages[:turn], add_generation_prompt=True
        ):
            raise UserError(
                "The chat template renders a conversation differently from its beginning, so "
                "assistant turns cannot be located",
                where="--model",
                fix="Use a model whose chat template renders turns one after another (ChatML, Llama)",
            )
        end = len(through_turn)
        span = input_ids[start:end]
        if tokenizer.eos_token_id in span:  # stop at the turn's EOS; what follows it is template glue
            end = start + len(span) - span[::-1].index(tokenizer.eos_token_id)
        labels[start:end] = input_ids[start:end]
    return input_ids[:max_length], labels[:max_length]
