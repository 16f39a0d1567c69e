"""First-token latency and decoding speed of each way `instruct generate` can load a model, side by side.

Paths, each loaded by the project's own loaders (instruct_cli.core.models and core.inference):

  nf4        the base in 4-bit (bitsandbytes), generate's default before `auto`
  fp32       the base unquantised, float32 (the CPU's compute dtype; what --quantization none gives)
  bf16       the base unquantised, bfloat16 (what `auto` picks on a CPU with bf16 instructions)
  merged     a run's LoRA adapter merged into the base, in the dtype `auto` picks here, read from the cache
             (as every call after the first)
  unmerged   the same adapter applied by peft on the same base (how generate ran a run before)
  llama.cpp  `--engine llama.cpp` (when llama-cpp-python is installed): the base's own GGUF file (the built-in
             model's Q4_1) and the run merged into a f16 GGUF, each timed twice: through instruct's engine
             (core/llama_engine: our tokenizer renders the prompt, text streamed) and through the binding alone
             on the same file (`Llama.generate`), which is llama.cpp's own rate. Batch 1 only (the engine
             answers one prompt at a time).

Each is timed at batch 1 (one streamed answer) and batch 8 (left-padded prompts, as `--input` does), greedy,
with transformers' `generate` and the model's own generation_config (as `instruct generate`), after one warm-up
call: "first token" is the time from the generate call to the first new token (the prefill), "decode" is the
new tokens after the first over the time they took (at batch 8, every row's tokens). Every answer runs to
--new-tokens tokens (`min_new_tokens`), so all paths decode the same number. "same tokens as" says whether
a path's greedy batch-1 tokens are those of the path it stands in for (nf4 and bf16: fp32; merged: unmerged).

Then the real command in a fresh process, as a user runs it (warm cache, so the merge of the run's adapter is
already cached): `instruct generate "What is 2+2?"` with its defaults, from process start to the first byte on
stdout and to the end, for the base model and for the run.

    .venv/bin/python benchmarks/bench_generate.py                   # the built-in model (smollm2-135m), ~3 min
    .venv/bin/python benchmarks/bench_generate.py --model DIR --run RUN_DIR --new-tokens 128
    .venv/bin/python benchmarks/bench_generate.py --smoke           # the tiny test model, a few tokens (CI)

Without --run, a run folder with a random LoRA adapter (r 16 on every linear layer) is made on the model.
Prints numbers only, never asserts a timing; exits 1 when a path fails to run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_machine_header, print_table  # noqa: E402

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain how a bicycle works.",
    "What is the capital of France? Tell me about it.",
    "List ten fruits and describe each one.",
    "Write a poem about the sea at night.",
    "How do plants grow?",
    "Describe a busy market in the morning.",
    "Why is the sky blue?",
]
PATHS = ("nf4", "fp32", "bf16", "merged", "unmerged", "llama.cpp")


def make_run(work: Path, model: str) -> Path:
    """A complete sft run folder on `model` with a random LoRA adapter (every linear layer, r 16)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from instruct_cli.core import artifacts, models

    source = models.resolve_model(model)
    base = models.load_base_model(source, "none", "cpu")
    torch.manual_seed(0)
    adapter = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():  # small random B: the adapter changes the weights without wrecking the model
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    run = artifacts.RunFolder.open(work / "run", "sft", {}, extra={"base_model": source.record()})
    adapter.save_pretrained(run.path / models.ADAPTER_DIR)
    run.complete()
    return run.path


def path_dtype(path: str):
    """The dtype of a path: merged and unmerged run in what `auto` picks for this CPU."""
    import torch

    from instruct_cli.core import inference

    if path in ("merged", "unmerged"):
        return inference.sampling_dtype(torch.device("cpu"))
    return torch.bfloat16 if path == "bf16" else torch.float32


def load(path: str, model: str, run: Path):
    """(model, tokenizer) of one path, loaded as instruct loads it (a merge is read from the cache)."""
    import torch
    from peft import PeftModel

    from instruct_cli.core import inference, models

    source = models.resolve_model(str(run) if path in ("merged", "unmerged") else model)
    tokenizer = models.load_tokenizer(source)
    if path == "merged":
        return inference.ready_model(source, path_dtype(path), torch.device("cpu"))[0], tokenizer
    base = models.load_base_model(source, "nf4" if path == "nf4" else "none", "cpu", path_dtype(path))
    if path == "unmerged":
        base = PeftModel.from_pretrained(base, str(source.adapter), is_trainable=False).eval()
    return base, tokenizer


def timed_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> tuple[float, float, list[int]]:
    """(first-token seconds, decode tokens/s, the first row's new tokens) of one greedy generate call."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from instruct_cli.core import chat, sampling

    class Clock(BaseStreamer):
        """Records when generate hands over the prompt (first put) and each step's new tokens."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    encoded = [chat.encode_prompt(tokenizer, chat.to_messages(p)) for p in prompts]
    input_ids, attention_mask = sampling.left_pad(encoded, tokenizer.pad_token_id, "cpu")
    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=clock,
        )
    steps = clock.times[1:]  # times[0]: the prompt
    decode = (len(steps) - 1) * len(prompts) / (steps[-1] - steps[0]) if len(steps) > 1 else float("nan")
    return steps[0] - start, decode, output[0, input_ids.shape[1] :].tolist()


def measure_llama_cpp(args, spec: str, label: str) -> list[list]:
    """Two rows for the model `spec` in llama.cpp: through instruct's engine, and the binding alone on the same
    file. Greedy, batch 1; the engine's answer stops at EOS, so its prompt asks for a long story."""
    from instruct_cli.core import chat, llama_engine
    from instruct_cli.core.config import SamplingOptions

    started = time.perf_counter()
    engine, _ = llama_engine.load(spec, context=1024)
    load_s = time.perf_counter() - started
    options = SamplingOptions(max_new_tokens=args.new_tokens, greedy=True)
    engine.answer(chat.to_messages(PROMPTS[1]), replace(options, max_new_tokens=4))  # warm-up
    best = (float("inf"), 0.0)
    for _ in range(args.repeats):
        times: list[float] = []
        start = time.perf_counter()
        engine.answer(
            chat.to_messages(PROMPTS[0]), options, on_text=lambda _, times=times: times.append(time.perf_counter())
        )
        decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
        best = (min(best[0], times[0] - start), max(best[1], decode))
    rows = [[f"llama.cpp via instruct ({label}, {engine.path.name})", load_s, best[0] * 1000, best[1], "", "", ""]]
    ids = chat.encode_prompt(engine.tokenizer, chat.to_messages(PROMPTS[0]))
    own = (float("inf"), 0.0)
    for _ in range(args.repeats):
        times = []
        start = time.perf_counter()
        for _token in engine.llama.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            if len(times) == args.new_tokens:
                break
        own = (min(own[0], times[0] - start), max(own[1], (len(times) - 1) / (times[-1] - times[0])))
    rows.append([f"llama.cpp alone, same file ({label})", "", own[0] * 1000, own[1], "", "", ""])
    engine.close()
    return rows


def measure_paths(args, run: Path) -> tuple[list[list], list[str]]:
    """One table row per path; the names of the paths that failed."""
    import torch

    from instruct_cli.core import inference, models

    rows, failed, tokens = [], [], {}
    compare = {"nf4": "fp32", "bf16": "fp32", "merged": "unmerged"}
    for path in args.paths:
        if path == "llama.cpp":
            for spec, label in ((args.model, "base"), (str(run), "run")):
                try:
                    rows.extend(measure_llama_cpp(args, spec, label))
                    print(f"[bench] {path} {label}: {rows[-2:]}", flush=True)
                except Exception:
                    traceback.print_exc()
                    failed.append(f"{path} {label}")
            continue
        try:
            if path == "merged":  # the first call merges and caches; every later call reads the cache
                inference.ready_model(models.resolve_model(str(run)), path_dtype(path), torch.device("cpu"))
            started = time.perf_counter()
            model, tokenizer = load(path, args.model, run)
            load_s = time.perf_counter() - started
            timed_generate(model, tokenizer, PROMPTS[:1], 4)  # warm-up: one-off costs of the first call
            results = {}
            for batch in (1, 8):
                runs = [timed_generate(model, tokenizer, PROMPTS[:batch], args.new_tokens) for _ in range(args.repeats)]
                results[batch] = (min(r[0] for r in runs), max(r[1] for r in runs), runs[0][2])
            tokens[path] = results[1][2]
            name = (
                f"{path} ({str(path_dtype(path)).removeprefix('torch.')})" if path in ("merged", "unmerged") else path
            )
            rows.append([name, load_s, results[1][0] * 1000, results[1][1], results[8][0] * 1000, results[8][1], ""])
            print(f"[bench] {path}: {rows[-1]}", flush=True)
            del model
        except Exception:  # a path that fails is reported, and the others still run
            traceback.print_exc()
            failed.append(path)
    for row, path in zip(rows, [p for p in args.paths if p not in failed and p != "llama.cpp"]):
        other = compare.get(path)
        if other in tokens:  # greedy batch-1 tokens, the same as those of the path it stands in for?
            row[-1] = f"{other}: {'yes' if tokens[path] == tokens[other] else 'no'}"
    return rows, failed


def measure_cli(args, spec: str, label: str, engine: str = "transformers") -> list:
    """The real command in a fresh process: seconds to the first byte on stdout, and to the end."""
    command = [sys.executable, "-m", "instruct_cli", "generate", "--model", spec, "--greedy", "--engine", engine]
    command += ["--max-new-tokens", str(args.new_tokens), "What is 2+2?"]
    best = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        first = process.stdout.read(1)
        first_s = time.perf_counter() - start
        rest = process.stdout.read()
        errors = process.stderr.read().decode(errors="replace")
        total_s = time.perf_counter() - start
        if process.wait() != 0 or not first:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{errors[-2000:]}")
        words = len((first + rest).decode(errors="replace").split())
        said = " ".join(errors.split())  # the line about auto's choice, unwrapped, without the model's name
        said = said[: said.find(" (auto:")] if " (auto:" in said else ""
        choice = said[said.find("+ adapter") :] if "+ adapter" in said else said.split(": ")[-1]
        choice = choice if engine == "transformers" else "llama.cpp"
        if best is None or first_s < best[1]:
            best = [label, first_s, total_s, words, choice]
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="Any model reference (default: the built-in one)")
    parser.add_argument("--run", type=Path, help="A run folder on --model (default: one with a random adapter)")
    parser.add_argument("--new-tokens", type=int, default=64, help="Tokens generated per answer")
    parser.add_argument("--repeats", type=int, default=2, help="Timed calls per setting; the best is shown")
    parser.add_argument(
        "--paths", nargs="+", choices=PATHS, help="Which paths to time (default: all; llama.cpp where installed)"
    )
    parser.add_argument("--threads", type=int, help="torch threads for the in-process paths (default: torch's)")
    parser.add_argument("--no-cli", action="store_true", help="Skip timing the real command")
    parser.add_argument("--smoke", action="store_true", help="The tiny test model, 4 tokens, one call each (CI)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    if args.smoke:  # a private cache, so that CI neither reads nor fills the user's
        os.environ["INSTRUCT_CACHE"] = str(work / "cache")
        from instruct_cli.core.tiny import build_tiny_model

        args.model, args.new_tokens, args.repeats = str(build_tiny_model(work / "tiny")), 4, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from instruct_cli.core import inference, llama_engine, models

    if args.paths is None:
        args.paths = [p for p in PATHS if p != "llama.cpp" or llama_engine.available()]
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine_header()
    print(
        f"[bench] {args.model}, {args.new_tokens} new tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    made_run = args.run is None
    run = make_run(work, args.model) if made_run else args.run.resolve()
    try:
        rows, failed = measure_paths(args, run)
        header = [
            "path",
            "load s",
            "first token ms (b1)",
            "decode tok/s (b1)",
            "first token ms (b8)",
            "decode tok/s (b8)",
            "same tokens as",
        ]
        print_table(f"generate on {args.model} (greedy, {args.new_tokens} new tokens)", header, rows)
        if not args.no_cli:
            cli_rows = []
            engines = ["transformers"] + (["llama.cpp"] if "llama.cpp" in args.paths else [])
            for engine in engines:
                for spec, label in ((args.model, "base model"), (str(run), "run")):
                    label += "" if engine == "transformers" else ", --engine llama.cpp"
                    try:
                        cli_rows.append(measure_cli(args, spec, label, engine))
                    except Exception:
                        traceback.print_exc()
                        failed.append(f"cli {label}")
            header = ["instruct generate", "first byte s", "total s", "words", "what auto chose"]
            print_table("the real command, fresh process, warm cache (from process start)", header, cli_rows)
    finally:
        if made_run:  # the merge of the throwaway adapter is of no use to anyone
            shutil.rmtree(
                inference.ready_folder(models.resolve_model(str(run)), path_dtype("merged")), ignore_errors=True
            )
            llama_engine.cached_path(models.resolve_model(str(run))).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"[bench] FAILED: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
