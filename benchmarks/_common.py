"""Shared pieces of the instruct-vs-TRL benchmarks: the model, the synthetic data, TRL, measurement, tables.

Nothing here is part of the `instruct_cli` package; TRL is installed into benchmarks/.trl (git-ignored) and
only ever imported by the TRL worker subprocess, through PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
INSTRUCT = str(VENV_BIN / "instruct") if (VENV_BIN / "instruct").exists() else shutil.which("instruct") or "instruct"
TRL_DIR = BENCH_DIR / ".trl"
TRL_VERSION = "1.16.0"


# ------------------------------------------------------------------------------------------------- TRL
def ensure_trl() -> bool:
    """Install TRL into benchmarks/.trl (no dependencies: transformers, accelerate, datasets are already there);
    False, with a message saying so, when the package registry cannot be reached (the TRL side is skipped)."""
    if (TRL_DIR / "trl" / "__init__.py").is_file():
        return True
    print(
        f"[bench] TRL is not installed for the benchmark: installing trl=={TRL_VERSION} into {TRL_DIR} "
        "(--no-deps; the project's venv is not changed)",
        flush=True,
    )
    installed = subprocess.run(
        [
            PYTHON,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "--target",
            str(TRL_DIR),
            f"trl=={TRL_VERSION}",
        ],
        check=False,
    )
    if installed.returncode != 0:
        print(
            f"[bench] SKIPPED the TRL side: trl=={TRL_VERSION} could not be installed (exit {installed.returncode}; "
            "is the package registry reachable?). Only instruct's side runs.",
            flush=True,
        )
        return False
    return True


def base_env(work: Path) -> dict[str, str]:
    """The environment both sides run in: offline, caches inside the work folder, no tokenizer threads."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(work / "hf-home"),
            "HF_DATASETS_CACHE": str(work / "hf-datasets"),
            "INSTRUCT_CACHE": str(work / "instruct-cache"),
            "WANDB_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("PYTHONPATH", None)
    return env


def trl_env(work: Path) -> dict[str, str]:
    """base_env plus TRL on the import path."""
    env = base_env(work)
    env["PYTHONPATH"] = str(TRL_DIR)
    return env


# ----------------------------------------------------------------------------------------------- model
def build_model(
    folder: Path, *, hidden: int, layers: int, intermediate: int, heads: int, vocab_size: int = 0, seed: int = 0
) -> Path:
    """A random Llama with the tokenizer (and ChatML template) of `instruct_cli.core.tiny`, saved to `folder`.

    `vocab_size` > the tokenizer's pads the embedding and LM head (like real checkpoints, whose matrices are
    rounded up), so the cost of the vocabulary-sized logits can be made realistic; 0 keeps the tokenizer's 384.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from instruct_cli.core.tiny import build_tiny_model

    tiny = build_tiny_model(folder.parent / (folder.name + "-tokenizer"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    vocab = max(len(tokenizer), vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # as instruct_cli.core.tiny does (0.25 at hidden 64), scaled so logits stay of order 10
        model.model.embed_tokens.weight.normal_(0.0, 2.0 / hidden**0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(tiny, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"[bench] built a random Llama in {folder}: hidden {hidden}, {layers} layers, intermediate "
        f"{intermediate}, {heads} heads, vocab {vocab}, {params / 1e6:.1f}M parameters",
        flush=True,
    )
    return folder


def default_model(work: Path, args) -> Path:
    """--model if given, else a random Llama built from the --hidden/--layers/... flags."""
    if args.model:
        return Path(args.model).resolve()
    return build_model(
        work / "model",
        hidden=args.hidden,
        layers=args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )


def add_model_flags(parser) -> None:
    """Flags shared by both benchmarks: the model, the data size, and the training shape."""
    parser.add_argument(
        "--model",
        help="A transformers chat-model folder (with a chat template) to use instead of "
        "the random Llama built at run time",
    )
    parser.add_argument("--hidden", type=int, default=256, help="Hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="Layers of the random Llama")
    parser.add_argument("--intermediate", type=int, default=688, help="MLP size of the random Llama")
    parser.add_argument("--heads", type=int, default=8, help="Attention heads of the random Llama")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="Pad the random Llama's vocabulary to this size (0: the tokenizer's 384 tokens; "
        "e.g. 32000 makes the LM head as costly as in a real model)",
    )
    parser.add_argument("--rows", type=int, default=200, help="Synthetic rows to generate")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows per optimizer step (no accumulation)")
    parser.add_argument("--max-steps", type=int, default=40, help="Optimizer steps on each side")
    parser.add_argument("--max-length", type=int, default=512, help="Longest sequence in tokens")
    parser.add_argument("--lr", type=float, default=2e-4, help="Learning rate on both sides")
    parser.add_argument(
        "--quantization",
        choices=("none", "nf4"),
        default="none",
        help="none: fp32 base on CPU (default); nf4: 4-bit base via bitsandbytes on both sides",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Turn gradient checkpointing on for both sides (off by default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, the model and both trainings")
    parser.add_argument(
        "--work",
        type=Path,
        help="Folder for the model, data and runs (default: a fresh "
        "folder under /tmp, removed at the end unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the work folder")
    parser.add_argument("--only", choices=("instruct", "trl"), help="Run one side only")
    parser.add_argument(
        "--repeats", type=int, default=2, help="Runs per side, interleaved; the table shows each side's fastest run"
    )
    parser.add_argument(
        "--trl-group-by-length",
        action="store_true",
        help="Give TRL length-grouped batches (train_sampling_strategy=group_by_length), as instruct "
        "always batches; by default TRL keeps its random sampler",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="Before each run, wait up to this long for other work to leave the CPUs (0: do not wait)",
    )
    parser.add_argument(
        "--prewarm-gib", type=float, default=0, help="GiB of memory to touch once before timing (0: off); see README"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="The same code path on a tiny model, a few steps, each side once (well under a minute of training): "
        "checks that every side runs and produces its numbers; exits non-zero if one does not",
    )


SMOKE_SHAPE = dict(hidden=64, layers=2, intermediate=128, heads=4, rows=24, max_steps=3, max_length=256, repeats=1)
"""What --smoke sets (sft and rm)."""


def apply_smoke(args) -> None:
    """Shrink the work to SMOKE_SHAPE when --smoke was given; then raise --max-length to `args.max_length_floor`
    when the script set one (bench_rm's real-shaped data)."""
    if getattr(args, "smoke", False):
        for key, value in SMOKE_SHAPE.items():
            setattr(args, key, value)
    floor = getattr(args, "max_length_floor", 0)
    if args.max_length < floor:
        print(f"[bench] --max-length {args.max_length} -> {floor} (no row cut or dropped)", flush=True)
        args.max_length = floor


# ------------------------------------------------------------------------------------------------- data
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


def tokens_per_word(model: Path) -> float:
    """How many tokens one random word of the corpus takes with `model`'s tokenizer (with its space)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rng, words = random.Random(0), _words()
    sample = " ".join(rng.choice(words) for _ in range(2000))
    return len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000


def _real_shaped(seed: int, model: Path):
    """(rng, text(tokens) -> random-word text of about that many tokens of `model`'s tokenizer, prompt() -> a
    realistic prompt as messages): the generator both real-shaped data sets share."""
    rng, words, ratio = random.Random(seed), _words(), tokens_per_word(model)

    def text(tokens: int) -> str:
        count = max(1, round(tokens / ratio))
        body = " ".join(rng.choice(words) for _ in range(count))
        return body[0].upper() + body[1:] + "."

    def prompt() -> list[dict]:
        budget = rng.randint(*REAL_SHAPE["prompt"])
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


def real_preference_rows(n: int, seed: int, model: Path) -> list[dict]:
    """`n` preference rows with realistic shapes: prompts of 100-400 tokens (of `model`'s tokenizer, before
    the chat template), responses of 30-200; a third of the prompts are multi-turn (user, assistant, user),
    a quarter have a system message. Random words, deterministic in `seed`; no network."""
    rng, text, prompt = _real_shaped(seed, model)
    rows = []
    for _ in range(n):
        messages = prompt()
        chosen, rejected = (text(rng.randint(*REAL_SHAPE["response"])) for _ in range(2))
        rows.append({"prompt": messages, "chosen": chosen, "rejected": rejected})
    return rows


def real_sft_rows(n: int, seed: int, model: Path) -> list[dict]:
    """`n` conversations with the shapes of `real_preference_rows` (the same prompts), each ending in one
    assistant answer of 30-200 tokens. The multi-turn third has an earlier assistant turn too: instruct
    learns it as well, TRL (loss on the completion) only the last; tokens/s counts every non-pad token alike."""
    rng, text, prompt = _real_shaped(seed, model)
    rows = []
    for _ in range(n):
        messages = prompt() + [{"role": "assistant", "content": text(rng.randint(*REAL_SHAPE["response"]))}]
        rows.append({"messages": messages})
    return rows


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


# ------------------------------------------------------------------------------------------ measurement
def step_batches(lengths: list[int], batch_size: int, seed: int, max_steps: int) -> list[list[int]]:
    """Row indices of each optimizer step, as training.fit walks `training.length_grouped_batches` with one
    process and no accumulation (each epoch's batches built once)."""
    from instruct_cli.core import training

    steps, epoch = [], 0
    while len(steps) < max_steps:
        steps.extend(training.length_grouped_batches(lengths, batch_size, seed, epoch))
        epoch += 1
    return steps[:max_steps]


def run_instruct(
    step: str,
    model: Path,
    data: Path,
    work: Path,
    args,
    index: int,
    batches: Callable[[], list[dict]],
    extra: tuple[str, ...] = (),
) -> dict:
    """`instruct STEP` (sft or rm) through the real CLI, in its own subprocess, with the settings both sides
    share (and the step's own flags `extra`); its numbers from metrics.jsonl, its per-step batches from
    `batches()` (the CLI's own batcher)."""
    run = work / f"instruct-{step}-run-{index}"
    cmd = [
        INSTRUCT,
        step,
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(run),
        "--quantization",
        args.quantization,
        "--device",
        "cpu",
        "--lora-r",
        "16",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0",
        "--lora-targets",
        "all-linear",
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        "1",
        "--max-steps",
        str(args.max_steps),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--warmup-ratio",
        "0.03",
        "--weight-decay",
        "0",
        "--max-grad-norm",
        "1.0",
        "--seed",
        str(args.seed),
        "--eval-every",
        "100000",
        "--save-every",
        "100000",
        "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
        "--force",
        *extra,
    ]
    usage = measure(cmd, base_env(work), work / f"instruct-{step}-{index}.log", f"instruct {step}", args.wait_quiet)
    result = {"side": "instruct", **usage}
    if usage["rc"] != 0 or not (run / "metrics.jsonl").is_file():
        return result
    rows = read_jsonl(run / "metrics.jsonl")
    result.update(step_ends=instruct_step_ends(run), loop_tokens_per_s=rows[-1].get("train/tokens_per_s"))
    try:
        result["batches"] = batches()
    except Exception as exc:  # the CLI's internals moved: a failed side, not a row of n/a
        result["failed"] = f"could not recompute instruct's batches ({type(exc).__name__}: {exc})"
    return result


def run_trl(script: str, step: str, label: str, model: Path, data: Path, work: Path, args, index: int) -> dict:
    """TRL's trainer in its own subprocess (`script --trl-worker SPEC`), with TRL on PYTHONPATH."""
    spec = {
        **{k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "model": str(model),
        "data": str(data),
        "out": str(work / f"trl-{step}-run-{index}"),
        "result": str(work / f"trl-{step}-result-{index}.json"),
    }
    spec_file = work / f"trl-{step}-spec-{index}.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    cmd = [PYTHON, str(Path(script).resolve()), "--trl-worker", str(spec_file)]
    usage = measure(cmd, trl_env(work), work / f"trl-{step}-{index}.log", label, args.wait_quiet)
    result = {"side": "TRL", **usage}
    if usage["rc"] == 0:
        result.update(json.loads(Path(spec["result"]).read_text()))
    return result


def run_benchmark(
    args,
    *,
    step: str,
    task: str,
    rows: Callable[[int, int, Path], list[dict]],
    run_instruct: Callable,
    run_trl: Callable,
    report: Callable,
) -> None:
    """The body of bench_sft/bench_rm: model, data folder (`task`, from `rows(n, seed, model)`), interleaved runs of
    both sides (so slow spells of a shared machine hit both), results.json, the report; the work folder is
    removed at the end unless --work or --keep."""
    import tempfile

    apply_smoke(args)
    if args.only != "instruct" and not ensure_trl():
        args.only = "instruct"
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix=f"bench-{step}-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        prewarm_memory(args.prewarm_gib)
        model = default_model(work, args)
        raw = write_jsonl(work / f"raw-{task}.jsonl", rows(args.rows, args.seed, model))
        data = prepare_data(raw, work / f"data-{task}", task, model, base_env(work))
        runs: dict[str, list[dict]] = {}
        for index in range(args.repeats):
            if args.only != "trl":
                runs.setdefault("instruct", []).append(run_instruct(model, data, work, args, index))
            if args.only != "instruct":
                runs.setdefault("TRL", []).append(run_trl(model, data, work, args, index))
        (work / "results.json").write_text(json.dumps(runs, indent=1))
        report(runs, args)
        failed = [f"{side} run {i + 1}: {why}" for side, results in runs.items() for i, r in enumerate(results)
                  if (why := failure(r))]  # fmt: skip
        if failed:
            print("[bench] FAILED: " + "; ".join(failed), flush=True)
            raise SystemExit(1)
        print(
            f"[bench] done in {time.time() - started:.0f} s; work folder {work}"
            + ("" if args.keep or args.work else " (removed)")
        )
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


def failure(result: dict) -> str | None:
    """Why a side's run did not produce its numbers (None when it did): a failed side fails the benchmark."""
    if result.get("rc") != 0:
        return f"exit code {result.get('rc')}"
    if result.get("failed"):
        return result["failed"]
    if result.get("loop_tokens_per_s") is None:
        return "no throughput measured"
    return None


def trl_model_kwargs(quantization: str, **extra) -> dict:
    """from_pretrained kwargs of the TRL side: fp32, or the 4-bit config instruct uses on a CPU."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = {"dtype": torch.float32, **extra}
    if quantization == "nf4":
        kwargs.update(
            device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        )
    return kwargs


def train_and_record(trainer, result_path: str, **extra) -> None:
    """Train a TRL trainer with a step timer and a counting collator; write step end times, per-step batches
    and TRL's own token count as JSON to `result_path` (what run_trl reads back)."""
    import trl

    timer = step_timer_callback()
    trainer.add_callback(timer)
    trainer.data_collator = counter = CountingCollator(trainer.data_collator)
    output = trainer.train()
    batches = counter.batches[: len(timer.step_ends)]
    loop_s = timer.step_ends[-1] - timer.begin
    reported = [log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log]
    result = {
        "trl_version": trl.__version__,
        "step_ends": timer.step_ends,
        "batches": batches,
        "loop_s": loop_s,
        "loop_tokens_per_s": sum(b["tokens"] for b in batches) / loop_s,
        "trl_num_tokens": reported[-1] if reported else None,
        "train_runtime": output.metrics["train_runtime"],
        **extra,
    }
    Path(result_path).write_text(json.dumps(result))


def prewarm_memory(gib: float) -> None:
    """Touch `gib` GiB of memory once, all held at the same time, then free it.

    On a freshly started virtual machine whose memory the host backs lazily, the first touch of each page
    is slow (seconds per GiB), so whichever side runs first, or allocates more, would be charged for it.
    Touching the memory up front makes the sides' timings comparable; on a warm machine it takes a second.
    """
    if gib <= 0:
        return
    import numpy as np

    try:
        available = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        gib = min(gib, available / 2**20 - 3)
    except (OSError, StopIteration):
        pass
    start, chunks = time.perf_counter(), []
    for _ in range(int(gib)):
        chunks.append(np.ones(2**30, dtype=np.uint8))
    del chunks
    print(
        f"[bench] pre-touched {int(gib)} GiB of memory in {time.perf_counter() - start:.1f} s "
        "(slow only the first time on a fresh virtual machine)",
        flush=True,
    )


# Runs the command as its only child, so RUSAGE_CHILDREN is that command's (and its children's) alone.
_MEASURE = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
rc = subprocess.call(cmd)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as handle:
    json.dump({"rc": rc, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}, handle)
"""


def busy_cpus(seconds: float = 3.0) -> float:
    """How many CPUs were busy (not idle) over the next `seconds`, from /proc/stat."""

    def sample():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> None:
    """Wait (up to `max_wait` seconds) until other work leaves the CPUs alone: fewer than `threshold` CPUs busy."""
    if max_wait <= 0:
        return
    start = time.perf_counter()
    while (busy := busy_cpus()) >= threshold:
        if time.perf_counter() - start > max_wait:
            print(
                f"[bench] still {busy:.1f} CPUs busy with other work after {max_wait:.0f} s; timing anyway", flush=True
            )
            return
    waited = time.perf_counter() - start
    if waited > 4:
        print(f"[bench] waited {waited:.0f} s for other work to leave the CPUs", flush=True)


def gauge() -> float:
    """GFLOP/s of a small fp32 matmul right now (best of 5): how fast this machine is at the moment.

    Virtual machines on a shared host can run several times slower for a while; a run whose gauge is far
    below the others' was measured in such a spell.
    """
    import numpy as np

    a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        best = min(best, time.perf_counter() - start)
    return 10 * 2 * 512**3 / best / 1e9


def measure(cmd: list[str], env: dict, log: Path, label: str, wait: float = 0) -> dict:
    """Run `cmd` in its own subprocess; returns exit code, wall seconds, CPU seconds and peak RSS (MB) of that
    subprocess, and the machine gauge taken just before."""
    result_file = log.with_suffix(".rusage.json")
    wait_for_quiet(wait)
    speed = gauge()
    print(f"[bench] {label}: $ {' '.join(cmd)}", flush=True)
    print(f"[bench] {label}: log in {log}", flush=True)
    with open(log, "w") as handle:
        subprocess.run(
            [sys.executable, "-c", _MEASURE, str(result_file), *cmd],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    result = json.loads(result_file.read_text())
    result["gauge_gflops"] = speed
    result["load"] = os.getloadavg()[0]  # runnable processes, 1-minute average: above 2 on 2 cores = contention
    if result["rc"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"[bench] {label} FAILED with exit code {result['rc']}; last lines of {log}:\n{tail}", flush=True)
    return result


def step_timer_callback():
    """A transformers TrainerCallback recording when training starts and when each optimizer step ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.step_ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    return StepTimer()


class CountingCollator:
    """Wraps a data collator and records, per batch, its rows, non-pad tokens and padded size.

    With num_workers=0 the DataLoader collates batches in order (accelerate fetches one ahead), so the first
    N records are the batches of optimizer steps 1..N.
    """

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[dict] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        mask = batch["attention_mask"]
        self.batches.append({"rows": len(examples), "tokens": int(mask.sum()), "padded": int(mask.numel())})
        return batch


def steady(step_ends: list[float]) -> tuple[float, int]:
    """(seconds, steps) of steps 2..N-1: from the end of step 1 to the end of step N-1.

    The first step carries one-off warm-up costs, and on the instruct side the last step's metrics row is
    written after the end-of-run evaluation, so both are left out on both sides.
    """
    if len(step_ends) < 3:
        return float("nan"), 0
    return step_ends[-2] - step_ends[0], len(step_ends) - 2


def median_step(step_ends: list[float]) -> float:
    """Median seconds of steps 2..N-1."""
    gaps = [b - a for a, b in zip(step_ends[:-2], step_ends[1:-1])]
    return statistics.median(gaps) if gaps else float("nan")


def instruct_step_ends(run: Path) -> list[float]:
    """Per-step `time` of an instruct run's metrics.jsonl (seconds since the run folder was opened)."""
    rows = read_jsonl(run / "metrics.jsonl")
    return [row["time"] for row in sorted(rows, key=lambda r: r["step"])]


def summarise(result: dict) -> dict:
    """A side's numbers from its step end times and per-step batches ({rows, tokens, padded} per step).

    rows_per_s / tokens_per_s: steps 2..N-1 (see `steady`); median_step_*: the median over those steps of each
    step's own rate (robust to a slow spell of the machine); loop_rows_per_s: all N steps, over the loop time
    (TRL: on_train_begin to the end of step N; instruct: its own final tokens/s counter, converted with the
    recomputed token count); padding: share of batch positions that were padding, over all N steps;
    positions_per_s: batch positions, padding included, per second over steps 2..N-1 (raw compute speed).
    """
    nan = float("nan")
    ends, batches = result.get("step_ends") or [], result.get("batches")
    seconds, steps = steady(ends)
    out = {
        "steps": len(ends) or None,
        "median_step_s": median_step(ends),
        "rows_per_s": nan,
        "tokens_per_s": nan,
        "padding": nan,
        "tokens_per_step": nan,
        "loop_rows_per_s": nan,
        "loop_tokens_per_s": result.get("loop_tokens_per_s", nan),
        "median_step_tokens_per_s": nan,
        "median_step_rows_per_s": nan,
        "positions_per_s": nan,
    }
    if batches and steps:
        middle = batches[1 : len(ends) - 1]
        gaps = [b - a for a, b in zip(ends[:-2], ends[1:-1])]
        out["median_step_tokens_per_s"] = statistics.median(b["tokens"] / g for b, g in zip(middle, gaps))
        out["median_step_rows_per_s"] = statistics.median(b["rows"] / g for b, g in zip(middle, gaps))
        out["rows_per_s"] = sum(b["rows"] for b in middle) / seconds
        out["tokens_per_s"] = sum(b["tokens"] for b in middle) / seconds
        filled = sum(b.get("filled", b["tokens"]) for b in batches)  # packed rows hold fewer positions than tokens
        out["padding"] = 100 * (1 - filled / sum(b["padded"] for b in batches))
        out["tokens_per_step"] = sum(b["tokens"] for b in batches) / len(batches)
        out["positions_per_s"] = sum(b["padded"] for b in middle) / seconds
        loop_s = result.get("loop_s")
        if loop_s is None and out["loop_tokens_per_s"] == out["loop_tokens_per_s"]:  # instruct: from its counter
            loop_s = sum(b["tokens"] for b in batches) / out["loop_tokens_per_s"]
        if loop_s:
            out["loop_rows_per_s"] = sum(b["rows"] for b in batches) / loop_s
    return out


def best_run(results: list[dict], key: str) -> dict:
    """Of repeated runs of one side, the fastest by `key` of its summary (noise on a shared machine only
    ever slows a run down)."""
    ok = [r for r in results if r["rc"] == 0 and summarise(r)[key] == summarise(r)[key]]
    return max(ok, key=lambda r: summarise(r)[key]) if ok else results[-1]


# ------------------------------------------------------------------------------------------------ tables
def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A plain fixed-width table (stdout)."""
    cells = [header] + [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\n{title}")
    print(line)
    for index, row in enumerate(cells):
        print(" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print(line)
    print(line)


def ratio_row(a: list, b: list, skip=()) -> list:
    """The "instruct / TRL" row of two table rows (first column a label; columns in `skip` left blank)."""
    return ["instruct / TRL"] + ["" if i in skip else ratio(x, y) for i, (x, y) in enumerate(zip(a, b)) if i > 0]


def ratio(a, b) -> float:
    try:
        return a / b
    except (TypeError, ZeroDivisionError):
        return float("nan")
