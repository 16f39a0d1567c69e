"""`instruct generate`: answer one prompt (streamed to stdout) or a JSONL file of prompts (batched).

Works with any model reference (models.resolve_model): the built-in model, a hub id, a local folder, a
.gguf file, or an sft/ppo run folder, whose adapter is applied on its base. The answers come from transformers
(core/inference loads the model) or, with --engine llama.cpp, from llama.cpp (core/llama_engine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from instruct_cli.core import artifacts, chat, inference, llama_engine, sampling
from instruct_cli.core.config import GenerateConfig
from instruct_cli.core.console import progress, summary_table
from instruct_cli.core.data_folders import json_lines
from instruct_cli.core.errors import UserError


def run(config: GenerateConfig) -> None:
    """Generate for `config.prompt` (streamed) or for every prompt in `config.input` (batched to JSONL)."""
    if (config.prompt is None) == (config.input is None):
        raise UserError(
            "Give either a prompt or --input FILE (one of the two)",
            where="instruct generate",
            fix='Run `instruct generate "your question"` or `instruct generate --input prompts.jsonl`',
        )
    if config.input is not None:
        prompts = read_prompts(config.input, config.system)
    else:
        text = sys.stdin.read() if config.prompt == "-" else config.prompt
        if not text.strip():
            raise UserError(
                "The prompt is empty",
                where="the prompt argument" if config.prompt != "-" else "stdin",
                fix="Pass a non-empty prompt",
            )
        prompts = [chat.to_messages(text.strip(), config.system)]

    if config.engine == "llama.cpp":
        generate_with_llama_cpp(prompts, config)
        return
    model, tokenizer, _ = inference.load_for_inference(config.model, config.quantization, config.device)
    torch.manual_seed(config.seed)
    if config.input is None:
        stream_answer(model, tokenizer, prompts[0], config)
        return
    answers = generate_batch(model, tokenizer, prompts, config)
    rows = [{"prompt": prompt, "response": answer, "model": config.model} for prompt, answer in zip(prompts, answers)]
    write_rows(rows, config)


def generate_with_llama_cpp(prompts: list[list[dict]], config: GenerateConfig) -> None:
    """`--engine llama.cpp`: the answer streamed, or every answer of --input written, one prompt at a time."""
    engine, _ = llama_engine.load(config.model, config.device, quantization=config.quantization)
    try:
        if config.input is None:
            engine.stream_to_stdout(chat.encode_prompt(engine.tokenizer, prompts[0]), config)
            return
        rows = []
        with progress("generate", total=len(prompts)) as bar:
            for prompt in prompts:
                rows.append(
                    {"prompt": prompt, "response": engine.answer(prompt, config).strip(), "model": config.model}
                )
                bar.advance(1)
    finally:
        engine.close()
    write_rows(rows, config)


def write_rows(rows: list[dict], config: GenerateConfig) -> None:
    """The batch answers as JSONL: to --output (atomically, with a summary) or to stdout."""
    if config.output is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        artifacts.write_jsonl(config.output, rows)
        summary_table("generate", {"prompts": len(rows), "model": config.model, "output": str(config.output)})


def read_prompts(path: Path, system: str | None = None) -> list[list[dict]]:
    """Read a JSONL file of `{"prompt": text or messages}` rows (or plain text lines in a .txt file);
    `-` reads the JSONL rows from standard input, so `instruct generate --input - | instruct rm score --input -`
    chains."""
    if str(path) == "-":
        name, lines = "stdin", sys.stdin.read().splitlines()
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError("The prompts file does not exist", where=str(path), fix="Check the --input path")
        name, lines = str(path), path.read_text(encoding="utf-8").splitlines()
    if Path(name).suffix == ".txt":
        prompts = [chat.to_messages(line.strip(), system) for line in lines if line.strip()]
    else:
        prompts = []
        for number, row, where in json_lines(
            lines, name, fix="Fix the line, or use `instruct prepare-data --task prompts` to clean the file"
        ):
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
                raise UserError(
                    f"Line {number} has no `prompt` (text or a list of messages)",
                    where=where,
                    fix='Write each line as {"prompt": "..."}',
                )
            prompts.append(chat.to_messages(prompt, system))
    if not prompts:
        raise UserError("The prompts file has no prompts", where=str(path), fix="Add one JSON line per prompt")
    return prompts


def stream_answer(model, tokenizer, messages: list[dict], config: GenerateConfig) -> str:
    """Generate one answer, printing tokens to stdout as they come; returns the whole answer."""
    return sampling.stream_to_stdout(model, tokenizer, chat.encode_prompt(tokenizer, messages), config)


def generate_batch(model, tokenizer, prompts: list[list[dict]], config: GenerateConfig) -> list[str]:
    """Answer many prompts in left-padded batches (sorted by length to waste little on padding)."""
    device = next(model.parameters()).device
    encoded = [chat.encode_prompt(tokenizer, messages) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    with progress("generate", total=len(encoded)) as bar, torch.inference_mode():
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            input_ids, attention_mask = sampling.left_pad([encoded[i] for i in batch], tokenizer.pad_token_id, device)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **sampling.sampling_kwargs(config, tokenizer)
            )
            for row, index in enumerate(batch):
                answers[index] = tokenizer.decode(output[row, input_ids.shape[1] :], skip_special_tokens=True).strip()
            bar.advance(len(batch))
    return answers
