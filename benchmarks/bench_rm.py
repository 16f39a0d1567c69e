"""Benchmark `instruct rm` against TRL's RewardTrainer on the same model, data and LoRA settings, on this machine.

Both sides train a reward model -- LoRA (r=16, alpha=32, dropout 0, every linear layer of the decoder) plus
a fresh scalar head -- on the same preference pairs (the train split of a data folder made by
`instruct prepare-data --task prefs` from synthetic {prompt, chosen, rejected} rows), with the same batch size
in pairs, number of optimizer steps, max length, learning rate and schedule, seed, no gradient accumulation,
no evaluation during training, no checkpoints, and (by default) an fp32 base with gradient checkpointing off.
Each side runs in its own subprocess: `instruct rm ...` through the real CLI, and a TRL worker (this file with
--trl-worker) that imports TRL 1.16 from benchmarks/.trl (installed there on first use).

How the two models differ (by design, not by settings): instruct's reward model is the causal LM's decoder
body + a Linear(hidden, 1) head read at the response's EOS; TRL's is AutoModelForSequenceClassification
(the same body + a `score` Linear, saved through peft's modules_to_save) read at the last non-pad token.
Both run chosen and rejected of a batch through ONE forward pass; TRL as 2 x batch sequences, instruct (by
default, --shared-prefix) as one packed row per pair: the prompt once, then chosen and rejected, each
attending to the prompt and itself (`--no-shared-prefix` here passes that flag to measure the plain layout).

Data (`--data-shape`): `words` (default) is short random-word rows; `real` has realistic shapes -- prompts
of 100-400 tokens, a third of them multi-turn, responses of 30-200 (random words, deterministic, no
network); it raises --max-length to 1024 so that no row is cut (instruct) or dropped (TRL's filter). `long`
has ShareGPT-like lengths (prompts of 150-900 tokens, answers of 100-600) and keeps --max-length, so most
rows are cut: TRL 1.16's RewardTrainer drops every pair longer than its max_length instead of cutting it, so
its worker is given the token ids instruct trains on (instruct's cut, see `preferences.cut_group`), and both
sides compute the same tokens; "positions/pair" shows what each side's layout computes for them.

Printed for each side:
  * pairs/s: preference pairs of steps 2..N-1 divided by the time from the end of step 1 to the end of
    step N-1 (loading, tokenisation, the first step's warm-up and everything after the last step -- instruct's
    final evaluation and its reward normalisation pass -- are left out on both sides).
  * median step pairs/s: the median over those steps of each step's pairs / its duration.
  * loop pairs/s: all N steps, from each side's own clock (instruct: its final `train/tokens_per_s`
    converted with the recomputed token count; TRL: on_train_begin to the end of step N).
  * tokens/s: non-pad tokens (chosen + rejected) of steps 2..N-1 over the same time; padding: share of batch
    positions that were padding.
  * peak RSS: the largest resident set of that side's process (getrusage(RUSAGE_CHILDREN) in a wrapper
    process per side); cpu s and wall s: the whole process, loading and instruct's normalisation included.

Usage: .venv/bin/python benchmarks/bench_rm.py [--max-steps 40] [--batch-size 4] [--repeats 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from instruct_cli.core import preferences


# ---------------------------------------------------------------------------------------------- instruct
def instruct_batches(model: Path, data: Path, args) -> list[dict]:
    """The batches `instruct rm` trains on, step by step: pairs, non-pad tokens and padded size of each.

    Recomputed with the CLI's own tokenizer loading, preference encoder and length-grouped batcher (the CLI
    logs only a running tokens/s), so that both sides' throughput is measured over the same steps.
    """
    from instruct_cli.core import models

    tokenizer = models.load_tokenizer(str(model))
    rows = common.read_jsonl(data / "prefs.train.jsonl")
    groups, _ = preferences.encode_rows(tokenizer, rows, args.max_length, "prefs.train.jsonl")
    shared = not args.no_shared_prefix  # the CLI packs on the (Llama, sdpa) models of this benchmark
    lengths = preferences.group_lengths(groups, shared)
    batches = []
    for step in common.step_batches(lengths, args.batch_size, args.seed, args.max_steps):
        chosen = [groups[i] for i in step]
        sequences = [len(ids) for g in chosen for ids in g.responses]
        batches.append(
            {
                "rows": sum(len(g.pairs) for g in chosen),
                "tokens": sum(sequences),  # as TRL counts them: chosen + rejected, prompt included in both
                "padded": len(step) * max(lengths[i] for i in step) if shared else len(sequences) * max(sequences),
                "filled": sum(lengths[i] for i in step) if shared else sum(sequences),  # non-pad positions
            }
        )
    return batches


def run_instruct(model: Path, data: Path, work: Path, args, index: int) -> dict:
    """`instruct rm` through the real CLI (see common.run_instruct)."""
    # the reward normalisation after the last step is not timed; a small sample keeps the wall time short
    extra = ("--normalization-samples", "16") + (("--no-shared-prefix",) if args.no_shared_prefix else ())
    return common.run_instruct(
        "rm", model, data, work, args, index, lambda: instruct_batches(model, data, args), extra=extra
    )


def rows_for(args):
    """The synthetic rows of --data-shape: (n, seed, model) -> preference rows."""
    return {
        "real": common.real_preference_rows,
        "long": common.long_preference_rows,
        "words": common.preference_rows,
    }[args.data_shape]


def instruct_cut_pairs(model: str, rows: list[dict], max_length: int) -> list[dict]:
    """The rows as instruct trains on them, cut to `max_length` by instruct's rule, as TRL's pre-tokenized
    columns {"chosen_ids", "rejected_ids"} (which TRL's max-length filter then keeps)."""
    from instruct_cli.core import models

    groups, _ = preferences.encode_rows(models.load_tokenizer(model), rows, max_length, "prefs.train.jsonl")
    return [{"chosen_ids": g.responses[0], "rejected_ids": g.responses[1]} for g in groups]


def dropped_by_trl(model: str, rows: list[dict], max_length: int) -> int:
    """How many of the rows TRL's RewardTrainer would drop if given their text (chosen or rejected, prompt
    included, longer than max_length)."""
    from instruct_cli.core import models

    groups, _ = preferences.encode_rows(models.load_tokenizer(model), rows, 10**9, "prefs.train.jsonl")
    return sum(max(len(ids) for ids in g.responses) > max_length for g in groups)


# --------------------------------------------------------------------------------------------------- TRL
def run_trl(model: Path, data: Path, work: Path, args, index: int) -> dict:
    """TRL RewardTrainer in its own subprocess (this file with --trl-worker; see common.run_trl)."""
    return common.run_trl(__file__, "rm", "TRL RewardTrainer", model, data, work, args, index)


def trl_worker(spec_file: str) -> None:
    """Inside the TRL subprocess: train with RewardTrainer; write step end times and per-step batches as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    # The pairs instruct trains on (the data folder's train split), in TRL's conversational form with an
    # explicit prompt: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}.
    rows = common.read_jsonl(Path(spec["data"]) / "prefs.train.jsonl")
    if spec["data_shape"] == "long":  # TRL would drop the long pairs: give it the tokens instruct trains on
        dataset = Dataset.from_list(instruct_cut_pairs(spec["model"], rows, spec["max_length"]))
    else:
        dataset = Dataset.from_list(
            [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
        )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], **common.trl_model_kwargs(spec["quantization"], num_labels=1)
    )
    config = RewardConfig(
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
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="SEQ_CLS"
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    common.train_and_record(trainer, spec["result"], train_rows=len(trainer.train_dataset))


# ------------------------------------------------------------------------------------------------ report
HEADER = [
    "side",
    "steps",
    "pairs/step",
    "padding %",
    "positions/pair",
    "pairs/s",
    "median step pairs/s",
    "loop pairs/s",
    "tokens/s",
    "positions/s",
    "peak RSS MB",
    "cpu s",
    "wall s",
    "gauge GFLOP/s",
    "load",
]


def table_row(label: str, result: dict) -> list:
    s = common.summarise(result)
    batches = result.get("batches") or []
    pairs_per_step = sum(b["rows"] for b in batches) / len(batches) if batches else float("nan")
    positions = sum(b["padded"] for b in batches) / sum(b["rows"] for b in batches) if batches else float("nan")
    return [
        label,
        s["steps"] or "failed",
        pairs_per_step,
        s["padding"],
        positions,
        s["rows_per_s"],
        s["median_step_rows_per_s"],
        s["loop_rows_per_s"],
        s["tokens_per_s"],
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
        common.print_table("RM, every run", HEADER, rows)
    best = {side: common.best_run(results, "rows_per_s") for side, results in runs.items()}
    rows = [table_row(side, result) for side, result in best.items()]
    if len(best) == 2:
        rows.append(common.ratio_row(*rows, skip=(1, 2, 3, 13, 14)))  # not for steps, pairs/step, padding, gauge, load
    common.print_table(
        f"RM ({'fastest of ' + str(args.repeats) + ' runs per side' if args.repeats > 1 else 'one run per side'})"
        f": {args.max_steps} steps x {args.batch_size} pairs, max length {args.max_length}, quantization "
        f"{args.quantization}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        "LoRA r=16 alpha=32 dropout 0 all-linear + scalar head",
        HEADER,
        rows,
    )
    trl_run = best.get("TRL", {})
    print(
        f"data: {args.data_shape} shapes; instruct layout: "
        + (
            "one padded sequence per response (--no-shared-prefix)"
            if args.no_shared_prefix
            else "one packed row per pair (prompt once; padding % and positions/s count packed positions)"
        )
    )
    if args.data_shape == "long":
        rows = common.read_jsonl(Path(args.data_folder) / "prefs.train.jsonl")
        print(
            f"long rows: TRL was given instruct's cut token ids; given the texts, its max-length filter would "
            f"have dropped {dropped_by_trl(args.model_folder, rows, args.max_length)} of {len(rows)} pairs"
        )
    if trl_run.get("train_rows") is not None:
        print(
            f"(TRL kept {trl_run['train_rows']} training pairs after its max-length filter; its own num_tokens "
            f"after the last step: {trl_run.get('trl_num_tokens')}, counted in its collator: "
            f"{sum(b['tokens'] for b in trl_run['batches'])})"
        )
    print(
        "pairs/s and tokens/s: pairs (tokens of chosen + rejected) of steps 2..N-1 / time from the end of step 1 "
        "to the end of step N-1 (loading, step 1, instruct's final eval and reward normalisation excluded).\n"
        "positions/s: batch positions, padding included, per second over steps 2..N-1 (compute speed without "
        "the effect of padding).\n"
        "median step pairs/s: the median over steps 2..N-1 of each step's pairs / its duration (robust to a slow "
        "spell of the machine).\n"
        "loop pairs/s: all N steps by each side's own clock (instruct: train/tokens_per_s with the recomputed "
        "token count; TRL: on_train_begin to the end of step N).\n"
        "padding: share of batch positions that are padding (instruct batches by length; TRL samples "
        f"{'by length' if args.trl_group_by_length else 'at random'}).\n"
        "peak RSS: largest resident set of the side's process; cpu s / wall s: the whole process, loading "
        "included; gauge: GFLOP/s of a small matmul just before the run, load: the "
        "1-minute load average just after it (a low gauge or a load above the 2 cores marks contention).\n"
        "Ratios are instruct / TRL: above 1 means instruct is faster (pairs/s, tokens/s) or uses more "
        "(RSS, seconds)."
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
        help="words: short random-word pairs; real: prompts of 100-400 tokens (a third multi-turn), responses "
        "of 30-200 (raises --max-length to 1024); long: prompts of 150-900, responses of 100-600, cut at "
        "--max-length (TRL gets instruct's cut token ids)",
    )
    parser.add_argument(
        "--no-shared-prefix",
        action="store_true",
        help="Run instruct with --no-shared-prefix (one padded sequence per response, as before packing)",
    )
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return
    if args.data_shape == "real":  # no row cut (instruct) or dropped (TRL's filter); applied with --smoke too
        args.max_length_floor = 1024
    common.run_benchmark(
        args,
        step="rm",
        task="prefs",
        rows=rows_for(args),
        run_instruct=run_instruct,
        run_trl=run_trl,
        report=report,
    )


if __name__ == "__main__":
    main()
