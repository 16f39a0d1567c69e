"""`instruct chat`: a multi-turn conversation with any model or run in the terminal, answers streamed.

Owns the chat loop: reading lines (a prompt with line editing at a terminal, plain lines from a pipe), the
slash commands (/reset, /system, /save, /help, /exit), the prompt window — the whole conversation rendered
with the chat template, its oldest exchanges left out once it outgrows the model's context — and saving a
conversation as one `{"messages": [...]}` JSON line, which `instruct prepare-data` reads as SFT data.

Answers come from transformers, or with --engine llama.cpp from llama.cpp (core/llama_engine). Each answer
is sampled right after seeding with --seed, so it depends only on the conversation before it and
the flags: it is what `instruct generate` answers for the same messages, and a question asked again after
/reset gets the same answer.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape

from instruct_cli.core import artifacts, chat, inference, llama_engine, sampling
from instruct_cli.core.config import ChatConfig
from instruct_cli.core.console import console, info, warn
from instruct_cli.core.errors import UserError

PROMPT = ">>> "
HELP = """Type a message and press Enter: the model answers with the whole conversation in view.
  /reset          start a new conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone removes it)
  /save FILE      append the conversation to FILE (.jsonl) as {"messages": [...]}, for instruct prepare-data
  /help           this help
  /exit           leave (Ctrl-D too; Ctrl-C stops an answer, and leaves at the prompt)
  //text          send a message that starts with / (the first / is dropped)"""


@dataclass
class Conversation:
    """The chat so far: the system prompt, and the turns (user and assistant messages, alternating)."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)
    hidden: int = 0
    """How many of the oldest exchanges the model no longer sees (they do not fit its context)."""

    def messages(self) -> list[dict]:
        """The conversation as chat messages, the system prompt first."""
        return chat.to_messages(self.turns, self.system)


def prompt_window(
    tokenizer, system: str | None, turns: list[dict], budget: int | None, skip: int = 0
) -> tuple[list[int] | None, int]:
    """The token ids of the prompt for the next answer, and how many of the oldest exchanges they leave out.

    The prompt is the system prompt and the latest turns, rendered with the chat template and ending where the
    assistant's answer starts, in at most `budget` tokens (None: no limit). `turns` alternate user/assistant
    and end with the new user message. `skip` is where to start looking: as a conversation grows the window
    only moves forward. The ids are None when the new message alone does not fit.
    """
    starts = [index for index, message in enumerate(turns) if message["role"] == "user"]
    for left_out in range(min(skip, len(starts) - 1), len(starts)):
        ids = chat.encode_prompt(tokenizer, chat.to_messages(turns[starts[left_out] :], system))
        if budget is None or len(ids) <= budget:
            return ids, left_out
    return None, len(starts) - 1


def context_length(model, tokenizer, limit: int | None = None) -> int | None:
    """How many tokens the model attends to (its position embeddings or its tokenizer's limit), or `limit`
    when that is smaller; None when neither the model nor `limit` says."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    config = getattr(inner, "config", None)
    known = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    known += [tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else None, limit]  # 1e30: unset
    known = [value for value in known if isinstance(value, int) and value > 0]
    return min(known) if known else None


def save_conversation(path: Path, messages: list[dict]) -> int:
    """Append `{"messages": messages}` as one line to the JSONL file `path`; returns the rows it now holds.

    The file is read and written again through a temporary file and a rename (conversation files are small),
    so a crash leaves the old file or the new one, never half a line that would break prepare-data.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".jsonl":
        raise UserError(
            f"{path} is not a .jsonl file",
            where="/save",
            fix="Save to a JSON-lines file such as /save chats.jsonl (instruct prepare-data reads it)",
        )
    if path.is_dir():
        raise UserError(f"{path} is a folder", where="/save", fix="Give a file name such as chats.jsonl")
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    text = existing + json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
    artifacts.atomic_write_text(path, text)
    return sum(1 for line in text.splitlines() if line.strip())


class ChatSession:
    """One chat with one loaded model: `send` answers a message, `command` runs a slash command."""

    def __init__(self, model, tokenizer, config: ChatConfig, context: int | None, engine=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.engine = engine  # a core/llama_engine.LlamaEngine with --engine llama.cpp (then model is None)
        self.budget = None if context is None else context - config.max_new_tokens
        self.conversation = Conversation(config.system)

    def send(self, text: str) -> str | None:
        """Answer `text` with the whole conversation in view, streaming the answer to stdout; the exchange
        joins the conversation. None when the message was not answered (too long, or stopped with Ctrl-C)."""
        conversation = self.conversation
        turns = [*conversation.turns, {"role": "user", "content": text}]
        ids, hidden = prompt_window(self.tokenizer, conversation.system, turns, self.budget, conversation.hidden)
        if ids is None:
            warn(
                f"That message is too long for the model's context ({self.budget} tokens are left for the "
                "conversation after --max-new-tokens); it was not sent. Send a shorter one, or lower --max-new-tokens"
            )
            return None
        if hidden > conversation.hidden:
            info(
                f"[dim](the conversation outgrew the context: the model no longer sees its first {hidden} exchange(s))"
            )
        conversation.hidden = hidden
        try:
            answer = self.stream(ids)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            sys.stdout.flush()
            warn("Answer stopped; this exchange is left out of the conversation.")
            return None
        conversation.turns = [*turns, {"role": "assistant", "content": answer.strip()}]
        return answer

    def stream(self, ids: list[int]) -> str:
        """Sample an answer to the prompt `ids` (seeded with --seed), printing it to stdout as it comes."""
        if self.engine is not None:
            return self.engine.stream_to_stdout(ids, self.config)
        torch.manual_seed(self.config.seed)
        return sampling.stream_to_stdout(self.model, self.tokenizer, ids, self.config)

    def command(self, line: str) -> bool:
        """Run one slash command; False when it asks to leave. Mistakes are reported; the chat goes on."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.conversation = Conversation(self.conversation.system)
            info("New conversation.")
        elif name == "/system":
            self.conversation.system = argument or None
            info(f"System prompt set: {escape(argument)}" if argument else "System prompt removed.")
        elif name == "/save":
            self.save(argument)
        elif name in ("/help", "/?"):
            console.print(HELP, markup=False, highlight=False)
        else:
            warn(
                f"Unknown command {escape(name)}: /help lists the commands (start a message with // to send a leading /)"
            )
        return True

    def save(self, argument: str) -> None:
        """/save FILE: append the conversation to FILE, reporting any problem without ending the chat."""
        if not argument:
            warn("Give a file: /save chats.jsonl")
            return
        if not self.conversation.turns:
            warn("Nothing to save yet: the conversation has no answer.")
            return
        try:
            rows = save_conversation(Path(argument), self.conversation.messages())
        except UserError as exc:
            warn(escape(exc.paragraph()))
        except OSError as exc:
            warn(escape(f"Could not save to {argument}: {exc.strerror or exc}"))
        else:
            info(escape(f"Saved the conversation to {argument} ({rows} conversation(s) there)."))


def read_line(interactive: bool) -> str | None:
    """The next line typed or piped in; None at the end: Ctrl-D, Ctrl-C at the prompt, or the pipe's end."""
    try:
        if interactive:
            return console.input(f"[bold green]{PROMPT}[/bold green]")
        return sys.stdin.readline() or None
    except (EOFError, KeyboardInterrupt):
        if interactive:
            console.print()
        return None


def run(config: ChatConfig) -> None:
    """Chat with `config.model` until the input ends or /exit: at a terminal with a prompt, from a pipe one
    message per line with only the answers on stdout."""
    if config.max_context is not None and config.max_context <= config.max_new_tokens:
        raise UserError(
            f"--max-context {config.max_context} leaves no room for the conversation after --max-new-tokens "
            f"{config.max_new_tokens}",
            where="instruct chat",
            fix="Raise --max-context or lower --max-new-tokens",
        )
    engine = None
    if config.engine == "llama.cpp":
        engine, _ = llama_engine.load(
            config.model, config.device, context=config.max_context or 2**20, quantization=config.quantization
        )
        model, tokenizer, source = None, engine.tokenizer, engine.source
        context = engine.llama.n_ctx()
    else:
        model, tokenizer, source = inference.load_for_inference(config.model, config.quantization, config.device)
        context = context_length(model, tokenizer, config.max_context)
    if context is not None and context <= config.max_new_tokens:
        raise UserError(
            f"The model attends to {context} tokens, and --max-new-tokens {config.max_new_tokens} leaves none "
            "for the conversation",
            where="--max-new-tokens",
            fix=f"Use --max-new-tokens below {context} (a quarter of it leaves room for a long conversation)",
        )
    session = ChatSession(model, tokenizer, config, context, engine)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        adapter = f" + adapter {source.adapter.parent}" if source.adapter is not None else ""
        info(escape(f"instruct chat with {source.reference}{adapter} · /help for commands · Ctrl-D to leave"))
    with sigterm_leaves():
        while (line := read_line(interactive)) is not None:
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                if not session.command(text):
                    break
                continue
            session.send(text[1:] if text.startswith("//") else text)


@contextlib.contextmanager
def sigterm_leaves():
    """SIGTERM ends the chat (exit 143). The CLI turns SIGTERM into Ctrl-C, which here only stops an answer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(number, frame):
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
