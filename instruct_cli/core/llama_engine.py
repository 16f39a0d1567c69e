"""llama.cpp as the engine that samples answers (`instruct generate` and `chat` with `--engine llama.cpp`).

Owns, for generate and chat: the GGUF file llama.cpp runs for a model reference (`gguf_for`): the base's own file when the model came
as one (the built-in model, a .gguf path), else the weights (a run's adapter merged in, in fp32) written once
as an f16 GGUF into the cache, keyed like core/inference's ready weights by the base's fingerprint and the
adapter's content hash; loading it with llama-cpp-python, an optional extra that builds llama.cpp from source
(`load`); and streaming one answer (`LlamaEngine.answer`) with exactly the sampling asked for: llama.cpp's own
defaults (min-p 0.05, top-k 40) are set aside as core/sampling sets the model's generation_config aside.
Prompts are rendered by the model's own tokenizer (core/chat.encode_prompt) and handed over as token ids, so
the chat template and the stop token are the ones every other command uses. May use: chat, config, console,
errors, gguf_file, inference, models.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from rich.markup import escape

from instruct_cli.core import chat, models
from instruct_cli.core.config import SamplingOptions
from instruct_cli.core.console import info
from instruct_cli.core.errors import UserError

GGUF_DIR = "gguf"
CACHED_TYPE = "f16"
"""The tensor type of GGUF files made for the engine. f16 gave the fp32 model's greedy answers on the prompts
tried (a quickstart PPO run: 3 of 3) at 108-117 tokens/s here; q8_0 decoded at ~147 but changed an answer
("Two and two is two." where fp32 says "... four.")."""
INSTALL_HINT = (
    "Install it with `.venv/bin/pip install 'llama-cpp-python>=0.3.16'`: it compiles llama.cpp from source "
    "(needs cmake and a C++ compiler; 6 CPU-minutes on this project's 2-core machine), or drop --engine llama.cpp"
)


def available() -> bool:
    """Whether llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


# -------------------------------------------------------------------------------------------- the GGUF file
def cached_path(source: models.ModelSource, gguf_type: str = CACHED_TYPE) -> Path:
    """Where the engine's GGUF of `source` (adapter merged in) is kept."""
    from instruct_cli.core import inference

    return models.cache_dir() / GGUF_DIR / f"{inference.cache_stem(source)}-{gguf_type}.gguf"


def gguf_for(source: models.ModelSource, tokenizer, gguf_type: str = CACHED_TYPE) -> tuple[Path, bool]:
    """The GGUF file llama.cpp runs for `source`, and whether it was written now. A bare base that came as a
    GGUF file runs from that file; anything else is written once into the cache (merged in fp32, then
    `gguf_type`), atomically, so that an interrupted first call leaves no half-written file behind; the cache
    keeps the few files used last (inference.prune_ready)."""
    import torch

    from instruct_cli.core import gguf_file, inference

    base_file = models.gguf_origin(source)
    if base_file is not None and source.adapter is None:
        return base_file, False
    path = cached_path(source, gguf_type)
    if path.is_file():
        os.utime(path)
        return path, False
    where = f"--model {source.reference}"
    model, pre_tokenizer = gguf_file.exportable_model(source, tokenizer, torch.float32, where)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        gguf_file.write(model, tokenizer, partial, gguf_type, name=path.stem, pre_tokenizer=pre_tokenizer)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    inference.prune_ready(keep=path)  # the least recently used files beyond a few go, as ready weights do
    return path, True


def remove_orphans(path: Path) -> list[Path]:
    """Remove the half-written copies of `path` left by processes that were killed while writing it (their
    process is gone); a copy another running process is still writing is left alone. Returns what went."""
    prefix = f".{path.name}."
    removed = []
    for partial in path.parent.glob(f"{prefix}*.partial"):
        pid = partial.name[len(prefix) : -len(".partial")]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)
            removed.append(partial)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


# ------------------------------------------------------------------------------------------------ sampling
@dataclass
class LlamaEngine:
    """A GGUF model loaded in llama.cpp, with the transformers tokenizer that renders its prompts."""

    llama: object
    tokenizer: object
    path: Path
    source: models.ModelSource

    def answer(
        self, messages: list[dict], options: SamplingOptions, on_text: Callable[[str], None] | None = None
    ) -> str:
        """One answer to `messages` with the sampling flags of `options` (generate's or chat's), streamed piece
        by piece to `on_text` when given; returns the whole text. Stops at the tokenizer's EOS or after
        --max-new-tokens, as the transformers engine does."""
        return self.answer_ids(chat.encode_prompt(self.tokenizer, messages), options, on_text)

    def answer_ids(self, ids: list[int], options: SamplingOptions, on_text: Callable[[str], None] | None = None) -> str:
        """`answer` for a prompt already rendered as token ids (chat's window of the conversation)."""
        context = self.llama.n_ctx()
        if len(ids) >= context:
            raise UserError(
                f"The prompt is {len(ids)} tokens; the model's context holds {context}",
                where="the prompt",
                fix="Shorten the prompt",
            )
        self.llama.set_seed(options.seed)
        budget = min(options.max_new_tokens, context - len(ids))
        produced: list[int] = []
        line, shown = 0, ""  # where the current line's tokens start, and the part of its text handed out
        for token in self._tokens(ids, options):
            if token == self.tokenizer.eos_token_id:
                break
            produced.append(token)
            if on_text is not None:
                # only the current line is decoded again, as transformers' TextStreamer does: a long answer does
                # not cost a decode of everything before it at every token
                text = self.tokenizer.decode(produced[line:], skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # a character cut between two tokens waits for the next
                    on_text(text[len(shown) :])
                    line, shown = (len(produced), "") if text.endswith("\n") else (line, text)
            if len(produced) >= budget:
                break
        if on_text is not None:
            rest = self.tokenizer.decode(produced[line:], skip_special_tokens=True)
            if rest != shown:
                on_text(rest[len(shown) :])
        return self.tokenizer.decode(produced, skip_special_tokens=True)

    def stream_to_stdout(self, ids: list[int], options: SamplingOptions) -> str:
        """`answer_ids` printed to stdout as it comes, with a newline at the end (as the transformers engine's
        streamer prints it); returns the whole answer."""
        answer = self.answer_ids(ids, options, on_text=lambda text: print(text, end="", flush=True))
        print(flush=True)
        return answer

    def close(self) -> None:
        """Free llama.cpp's model and context now (its own finaliser fails when run at interpreter exit)."""
        self.llama.close()

    def _tokens(self, ids: list[int], options: SamplingOptions) -> Iterator[int]:
        """llama.cpp's sampled tokens after `ids`, from softmax(logits / T) with only the top-k / top-p asked
        for (min-p, typical-p, repetition and presence penalties off)."""
        if options.greedy:
            return self.llama.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        return self.llama.generate(
            ids,
            temp=options.temperature,
            top_k=options.top_k,  # 0 is off in llama.cpp too
            top_p=options.top_p,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=1.0,
            frequency_penalty=0.0,
            presence_penalty=0.0,
        )


def check_flags(quantization: str) -> None:
    """Refuse --quantization with the llama.cpp engine: llama.cpp runs the GGUF file's own types."""
    if quantization != "auto":
        raise UserError(
            f"--quantization {quantization} does not apply to the llama.cpp engine",
            where="--quantization",
            fix="Drop --quantization: llama.cpp runs the GGUF file's own types (f16 for a file it writes)",
        )


def load(
    spec: str,
    device: str = "auto",
    context: int = 4096,
    gguf_type: str = CACHED_TYPE,
    quantization: str = "auto",
) -> tuple[LlamaEngine, bool]:
    """`spec` (any model reference) loaded in llama.cpp with a context of `context` tokens (prompt and answer);
    says in one line when the GGUF file was written now. Returns (engine, whether it was)."""
    check_flags(quantization)
    if not available():
        raise UserError("--engine llama.cpp needs llama-cpp-python, which is not installed", fix=INSTALL_HINT)
    from instruct_cli.core import inference

    source = inference.resolve_generator(spec)
    if device not in ("auto", "cpu"):
        raise UserError(
            f"--engine llama.cpp runs on the CPU here; --device {device} is not supported with it",
            where="--device",
            fix="Drop --device (or use --device cpu), or use the transformers engine on the GPU",
        )
    tokenizer = models.load_tokenizer(source)
    path, written = gguf_for(source, tokenizer, gguf_type)
    if written:
        info(escape(f"{spec}: written as {path} for llama.cpp (once; cached for the next call)"))
    from llama_cpp import Llama
    from transformers import AutoConfig

    # past the length it was trained for, llama.cpp's rope gives a model garbage even on short prompts
    trained = getattr(AutoConfig.from_pretrained(source.load_path), "max_position_embeddings", None) or context
    llama = Llama(
        model_path=str(path),
        n_ctx=min(context, trained),
        n_threads=os.cpu_count() or 1,
        n_threads_batch=os.cpu_count() or 1,
        n_gpu_layers=0,
        verbose=False,
    )
    return LlamaEngine(llama, tokenizer, path, source), written
