"""Benchmark `instruct sft` against TRL's SFTTrainer on the same model, data and LoRA settings, on this machine.

Both sides train a LoRA adapter (r=16, alpha=32, dropout 0, every linear layer of the decoder) on the same
data folder (made by `instruct prepare-data` from synthetic single-turn conversations), with the same batch
size, number of optimizer steps, max length, learning rate and schedule, seed, no gradient accumulation, no
evaluation during training, no checkpoints, and (by default) an fp32 base with gradient checkpointing off.
Each side runs in its own subprocess: `instruct sft ...` through the real CLI, and a TRL worker (this file
with --trl-worker) that imports TRL 1.16 from benchmarks/.trl (installed there on first use).

Data (`--data-shape`): `words` (default) is single-turn random-word rows; `real` has realistic shapes -- the
prompts of bench_rm's real shape (100-400 tokens, a third multi-turn, a quarter with a system message), each
followed by one answer of 30-200 tokens (random words, deterministic, no network); it raises --max-length to
1024 so that no row is cut. `long` has ShareGPT-like lengths (prompts of 150-900 tokens, answers of
100-600) cut at --max-length, where both sides keep a conversation's first max-length tokens. `--packing` / `--no-packing` pass that flag to `instruct sft` (padding-free
batches; by default the CLI's default).

Printed for each side:
  * tokens/s: non-pad (attention-mask) tokens of steps 2..N-1 divided by the time from the end of step 1 to
    the end of step N-1 -- model loading, tokenisation, the first step's warm-up and anything after the last
    step (instruct's final evaluation) are left out on both sides. instruct's per-step token counts are
    recomputed with the CLI's own encoder and length-grouped batcher; TRL's are counted in its collator.
  * loop tokens/s: all N steps, from each side's own clock (instruct: the final `train/tokens_per_s` of
    metrics.jsonl; TRL: tokens over the time from on_train_begin to the end of step N).
  * padding: the share of batch positions that were padding (instruct groups rows by length, TRL's default
    sampler is random; --trl-group-by-length gives TRL length grouping too).
  * peak RSS: the largest resident set of that side's process, from getrusage(RUSAGE_CHILDREN) in a wrapper
    process per side (so nothing else is counted); cpu s and wall s: the whole process, loading included.

Usage: .venv/bin/python benchmarks/bench_sft.py [--max-steps 40] [--batch-size 4] [--repeats 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from instruct_cli.core import chat, packing


# ---------------------------------------------------------------------------------------------- instruct
def instruct_batches(model: Path, data: Path, args) -> list[dict]:
    """The batches `instruct sft` trains on, step by step: rows, non-pad tokens and padded size of each.

    Recomputed with the CLI's own tokenizer loading, conversation encoder and length-grouped batcher (the
    CLI logs only a running tokens/s), so that both sides' throughput is measured over the same steps.
    """
    from instruct_cli.core import models

    tokenizer = models.load_tokenizer(str(model))
    rows = common.read_jsonl(data / "sft.train.jsonl")
    lengths = [len(chat.encode_conversation(tokenizer, row["messages"], args.max_length)[0]) for row in rows]
    packed = instruct_packs(args)  # the CLI packs on the (Llama, sdpa) models of this benchmark
    batches = []
    for step in common.step_batches(lengths, args.batch_size, args.seed, args.max_steps):
        sizes = [lengths[i] for i in step]
        sequences = len(packing.bins(sizes, max(sizes))) if packed else len(sizes)  # as lm.collate_packed packs
        batches.append({"rows": len(sizes), "tokens": sum(sizes), "padded": sequences * max(sizes)})
    return batches


def instruct_packs(args) -> bool:
    """Whether `instruct sft` runs with padding-free batches: --packing/--no-packing, else the CLI's default."""
    from instruct_cli.core.config import SFTConfig

    return SFTConfig.packing if args.packing is None else args.packing


def run_instruct(model: Path, data: Path, work: Path, args, index: int) -> dict:
    """`instruct sft` through the real CLI (see common.run_instruct)."""
    extra = () if args.packing is None else ("--packing" if args.packing else "--no-packing",)
    return common.run_instruct(
        "sft", model, data, work, args, index, lambda: instruct_batches(model, data, args), extra=extra
    )


def rows_for(args):
    """The synthetic rows of --data-shape: (n, seed, model) -> sft rows."""
    return {"real": common.real_sft_rows, "long": common.long_sft_rows, "words": common.sft_rows}[args.data_shape]


# --------------------------------------------------------------------------------------------------- TRL
def run_trl(model: Path, data: Path, work: Path, args, index: int) -> dict:
    """TRL SFTTrainer in its own subprocess (this file with --trl-worker; see common.run_trl)."""
    return common.run_trl(__file__, "sft", "TRL SFTTrainer", model, data, work, args, index)


def trl_worker(spec_file: str) -> None:
    """Inside the TRL subprocess: train with SFTTrainer; write step end times and per-step batches as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # The rows instruct trains on (the data folder's train split), as conversational prompt/completion: the
    # loss is on the completion (the assistant turn), as instruct's is on the assistant turns.
    rows = common.read_jsonl(Path(spec["data"]) / "sft.train.jsonl")
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **common.trl_model_kwargs(spec["quantization"]))
    config = SFTConfig(
        output_dir=spec["out"],
        max_steps=spec["max_steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=spec["max_length"],
        packing=False,
        completion_only_loss=True,
        gradient_checkpointing=spec["gradient_checkpointing"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=spec["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if spec["trl_group_by_length"] else "random",
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    common.train_and_record(trainer, spec["result"])


# ------------------------------------------------------------------------------------------------ report
HEADER = [
    "side",
    "steps",
    "tokens/step",
    "padding %",
    "tokens/s",
    "median step tokens/s",
    "loop tokens/s",
    "positions/s",
    "peak RSS MB",
    "cpu s",
    "wall s",
    "gauge GFLOP/s",
    "load",
]


def table_row(label: str, result: dict) -> list:
    s = common.summarise(result)
    return [
        label,
        s["steps"] or "failed",
        s["tokens_per_step"],
        s["padding"],
        s["tokens_per_s"],
        s["median_step_tokens_per_s"],
        s["loop_tokens_per_s"],
        s["positions_per_s"],
        result["peak_rss_mb"],
        result["cpu_s"],
        result["wall_s"],
        result["gauge_gflops"],
        result.get("load"),
    ]


def report(runs: dict[str, list[dict]], args) -> None:
    """Every run (when repeated), then the table of each side's fastest run and the instruct/TRL ratios."""
    if args.repeats > 1:
        rows = [table_row(f"{side} #{i + 1}", r) for side, results in runs.items() for i, r in enumerate(results)]
        common.print_table("SFT, every run", HEADER, rows)
    best = {side: common.best_run(results, "tokens_per_s") for side, results in runs.items()}
    rows = [table_row(side, result) for side, result in best.items()]
    if len(best) == 2:
        rows.append(common.ratio_row(*rows, skip=(1, 3, 11, 12)))  # no ratio of steps, padding, gauge, load
    common.print_table(
        f"SFT ({'fastest of ' + str(args.repeats) + ' runs per side' if args.repeats > 1 else 'one run per side'})"
        f": {args.max_steps} steps x {args.batch_size} rows, max length {args.max_length}, quantization "
        f"{args.quantization}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        "LoRA r=16 alpha=32 dropout 0 all-linear",
        HEADER,
        rows,
    )
    print(
        f"data: {args.data_shape} shapes; instruct layout: "
        + (
            "padding-free packed batches (padding % and positions/s count packed positions)"
            if instruct_packs(args)
            else "padded, length-grouped batches"
        )
    )
    trl_run = best.get("TRL", {})
    if trl_run.get("trl_num_tokens") is not None:
        print(
            f"(TRL's own num_tokens after the last step: {trl_run['trl_num_tokens']:,}; counted in its collator: "
            f"{sum(b['tokens'] for b in trl_run['batches']):,})"
        )
    print(
        "tokens/s: non-pad tokens of steps 2..N-1 / time from the end of step 1 to the end of step N-1 "
        "(loading, step 1 and instruct's final eval excluded).\n"
        "loop tokens/s: all N steps by each side's own clock (instruct: metrics.jsonl train/tokens_per_s; TRL: "
        "on_train_begin to the end of step N).\n"
        "padding: share of batch positions that are padding (instruct batches by length; TRL samples "
        f"{'by length' if args.trl_group_by_length else 'at random'}).\n"
        "positions/s: batch positions, padding included, per second over steps 2..N-1 (compute speed without "
        "the effect of padding).\n"
        "median step tokens/s: the median over steps 2..N-1 of each step's tokens / its duration (robust to a "
        "slow spell of the machine).\n"
        "peak RSS: largest resident set of the side's process; cpu s / wall s: the whole process, loading "
        "included; gauge: GFLOP/s of a small matmul just before the run, load: the "
        "1-minute load average just after it (a low gauge or a load above the 2 cores marks contention).\n"
        "Ratios are instruct / TRL: above 1 means instruct is faster (tokens/s) or uses more (RSS, seconds)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_model_flags(parser)
    parser.add_argument("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument(
        "--data-shape",
        choices=("words", "real", "long"),
        default="words",
        help="words: single-turn random-word rows; real: prompts of 100-400 tokens (a third multi-turn) and "
        "answers of 30-200 (raises --max-length to 1024); long: prompts of 150-900 and answers of 100-600, cut "
        "at --max-length (both sides keep the start)",
    )
    parser.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Run instruct sft with --packing / --no-packing (default: the CLI's default)",
    )
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return
    if args.data_shape == "real":  # no row cut; applied with --smoke too
        args.max_length_floor = 1024
    common.run_benchmark(
        args, step="sft", task="sft", rows=rows_for(args), run_instruct=run_instruct, run_trl=run_trl, report=report
    )


if __name__ == "__main__":
    main()
