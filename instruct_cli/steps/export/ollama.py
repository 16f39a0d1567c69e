"""The Ollama `Modelfile` written beside an exported GGUF file.

`ollama create NAME -f Modelfile` reads it. Ollama prompts with Go templates, not Jinja, so the model's chat
template is translated where we can prove the translation right: a ChatML template (SmolLM2, Qwen2 and the
tiny test model: `<|im_start|>role\\n...<|im_end|>\\n`) is recognised by rendering it and comparing the text
with ChatML, and a system prompt the template adds by default becomes the Modelfile's SYSTEM. Any other
template gets only the FROM line and a comment: Ollama then uses the template embedded in the GGUF file.
"""

from __future__ import annotations

CHATML_GO_TEMPLATE = """{{- if .Messages }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

CHATML_STOPS = ("<|im_start|>", "<|im_end|>")

UNTRANSLATED = (
    "# This model's chat template is not ChatML, and Modelfiles take Go templates, not Jinja: with no TEMPLATE\n"
    "# here, Ollama uses the chat template embedded in the GGUF file (tokenizer.chat_template)."
)


def chatml(messages: list[dict]) -> str:
    """`messages` in ChatML, ending with the opening of the assistant's turn (a generation prompt)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def chatml_default_system(tokenizer) -> tuple[bool, str | None]:
    """(is the chat template ChatML, the system prompt it adds when the conversation has none, or None)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return False, None
    conversation = [
        {"role": "system", "content": "SYSTEM-PROBE"},
        {"role": "user", "content": "USER-PROBE-1"},
        {"role": "assistant", "content": "ASSISTANT-PROBE"},
        {"role": "user", "content": "USER-PROBE-2"},
    ]
    question = conversation[1:2]
    try:
        full = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        bare = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses these turns (no system role, strict alternation) is not ChatML
        return False, None
    if full != chatml(conversation):
        return False, None
    if bare == chatml(question):
        return True, None
    head, tail = "<|im_start|>system\n", "<|im_end|>\n" + chatml(question)
    if bare.startswith(head) and bare.endswith(tail):
        system = bare[len(head) : -len(tail)]
        if bare == chatml([{"role": "system", "content": system}, *question]) and '"""' not in system:
            return True, system
    return False, None


def modelfile(gguf_name: str, tokenizer) -> str:
    """The Modelfile text for the GGUF file `gguf_name` in the same folder."""
    lines = [
        "# Ollama: `ollama create NAME -f Modelfile` in this folder, then `ollama run NAME`.",
        f"FROM ./{gguf_name}",
    ]
    is_chatml, system = chatml_default_system(tokenizer)
    if not is_chatml:
        return "\n".join([*lines, UNTRANSLATED]) + "\n"
    lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in CHATML_STOPS]
    return "\n".join(lines) + "\n"
