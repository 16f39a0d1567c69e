"""Benchmark `instruct sft` against TRL's SFTTrainer on the same model, data and LoRA settings, on this machine.

Both sides train a LoRA adapter (r=16, alpha=32, dropout 0, every linear layer of the decoder) on the same
data folder (made by `instruct prepare-data` from synthetic single-turn conversations), with the same batch
size, number of optimizer steps, max length, learning rate, seed, no gradient accumulation, no evaluation
during training, no checkpoints, and (by default) an fp32 base with gradient checkpointing off. Each side runs
in its own subprocess: `instruct sft ...` through the real CLI, and a TRL worker (this file with
--trl-worker) that imports TRL from benchmarks/.trl.

Printed for each side:
  * tokens/s: non-pad tokens (attention-mask ones) of steps 2..N-1 divided by the time from the end of step 1
    to the end of step N-1 (model loading, data tokenisation, the first step's warm-up and anything after the
    last step are excluded on both sides). instruct's per-step token counts are recomputed with the CLI's own
    encoder and batcher; TRL's come from the batches its collator built.
  * loop tokens/s: all N steps, as each side itself reports it (instruct: the last `train/tokens_per_s` of
    metrics.jsonl; TRL: its token count over the time from on_train_begin to the end of step N).
  * padding: the share of batch positions that were padding.
  * peak RSS: the maximum resident set size of that side's process (getrusage(RUSAGE_CHILDREN) measured in a
    separate wrapper process per side, so nothing else is counted).
  * wall: the whole subprocess, model loading and tokenisation included.

Usage: .venv/bin/python benchmarks/bench_sft.py [--max-steps 40] [--batch-size 4] [--model DIR] ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


# ---------------------------------------------------------------------------------------------- instruct
def instruct_batches(model: Path, data: Path, args) -> list[dict]:
    """The batches `instruct sft` trains on, step by step: rows, non-pad tokens and padded size of each.

    Recomputed with the CLI's own tokenizer loading, conversation encoder and length-grouped batcher (the
    CLI logs only a running tokens/s), so that both sides' throughput is measured over the same steps.
    """
    from instruct_cli import models, sft, training

    tokenizer = models.load_tokenizer(str(model))
    rows = common.read_jsonl(data / "sft.train.jsonl")
    lengths = [len(sft.encode_conversation(tokenizer, row["messages"], args.max_length)[0]) for row in rows]
    per_epoch: dict[int, list[list[int]]] = {}
    batches = []
    for step in range(args.max_steps):  # as training.fit walks them with one process and no accumulation
        first = per_epoch.setdefault(0, training.length_grouped_batches(lengths, args.batch_size, args.seed, 0))
        epoch, position = divmod(step, len(first))
        if epoch not in per_epoch:
            per_epoch[epoch] = training.length_grouped_batches(lengths, args.batch_size, args.seed, epoch)
        sizes = [lengths[i] for i in per_epoch[epoch][position]]
        batches.append({"rows": len(sizes), "tokens": sum(sizes), "padded": len(sizes) * max(sizes)})
    return batches


def run_instruct(model: Path, data: Path, work: Path, args) -> dict:
    """`instruct sft` through the real CLI, in its own subprocess; its numbers from metrics.jsonl."""
    run = work / "instruct-sft-run"
    cmd = [common.INSTRUCT, "sft", "--model", str(model), "--data", str(data), "--out", str(run),
           "--quantization", args.quantization, "--device", "cpu", "--lora-r", "16", "--lora-alpha", "32",
           "--lora-dropout", "0", "--lora-targets", "all-linear", "--batch-size", str(args.batch_size),
           "--grad-accum", "1", "--max-steps", str(args.max_steps), "--max-length", str(args.max_length),
           "--lr", str(args.lr), "--seed", str(args.seed), "--eval-every", "100000", "--save-every", "100000",
           "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing", "--force"]
    usage = common.measure(cmd, common.base_env(work), work / "instruct-sft.log", "instruct sft")
    result = {"side": "instruct", **usage}
    if usage["rc"] != 0 or not (run / "metrics.jsonl").is_file():
        return result
    rows = common.read_jsonl(run / "metrics.jsonl")
    step_ends = common.instruct_step_ends(run)
    result.update(steps=len(rows), step_ends=step_ends, loop_tokens_per_s=rows[-1].get("train/tokens_per_s"))
    try:
        batches = instruct_batches(model, data, args)
    except Exception as exc:  # the CLI's internals moved: keep the numbers that do not need them
        print(f"[bench] could not recompute instruct's batches ({type(exc).__name__}: {exc}); "
              "steady-state tokens/s and padding are n/a for instruct", flush=True)
        batches = None
    result["batches"] = batches
    return result


# --------------------------------------------------------------------------------------------------- TRL
def run_trl(model: Path, data: Path, work: Path, args) -> dict:
    """TRL's SFTTrainer in its own subprocess (this file with --trl-worker), with TRL on PYTHONPATH."""
    spec = {**{k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
            "model": str(model), "data": str(data), "out": str(work / "trl-sft-run"),
            "result": str(work / "trl-sft-result.json")}
    spec_file = work / "trl-sft-spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    cmd = [common.PYTHON, str(Path(__file__).resolve()), "--trl-worker", str(spec_file)]
    usage = common.measure(cmd, common.trl_env(work), work / "trl-sft.log", "TRL SFTTrainer")
    result = {"side": "TRL", **usage}
    if usage["rc"] == 0:
        result.update(json.loads(Path(spec["result"]).read_text()))
    return result


def trl_worker(spec_file: str) -> None:
    """Inside the TRL subprocess: train with SFTTrainer and write step timings and batch counts as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import trl
    from trl import SFTConfig, SFTTrainer

    # The same rows instruct trains on (the data folder's train split), as conversational prompt/completion:
    # the loss is on the completion (the assistant turn), as instruct's is on the assistant turn.
    rows = common.read_jsonl(Path(spec["data"]) / "sft.train.jsonl")
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    kwargs = {"dtype": torch.float32}
    if spec["quantization"] == "nf4":  # as instruct loads it on a CPU
        kwargs.update(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    config = SFTConfig(
        output_dir=spec["out"], max_steps=spec["max_steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0.03,
        weight_decay=0.0, max_grad_norm=1.0, max_length=spec["max_length"], packing=False,
        completion_only_loss=True, gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True, bf16=False, fp16=False,
        seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)
    timer = common.step_timer_callback()
    trainer.add_callback(timer)
    trainer.data_collator = counter = common.CountingCollator(trainer.data_collator)
    output = trainer.train()
    reported = [log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log]
    loop_s = timer.step_ends[-1] - timer.begin
    tokens = sum(b["tokens"] for b in counter.batches[:len(timer.step_ends)])
    result = {"trl_version": trl.__version__, "steps": len(timer.step_ends), "step_ends": timer.step_ends,
              "batches": counter.batches[:len(timer.step_ends)], "loop_tokens_per_s": tokens / loop_s,
              "trl_num_tokens": reported[-1] if reported else None, "train_runtime": output.metrics["train_runtime"]}
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ report
def summarise(result: dict, batch_size: int) -> dict:
    """Steady-state numbers over steps 2..N-1 from a side's step end times and per-step batches."""
    ends, batches = result.get("step_ends") or [], result.get("batches")
    seconds, steps = common.steady(ends)
    summary = {"median_step_s": common.median_step(ends), "tokens_per_s": float("nan"), "padding": float("nan")}
    if batches and steps:
        middle = batches[1:len(ends) - 1]
        summary["tokens_per_s"] = sum(b["tokens"] for b in middle) / seconds
        summary["padding"] = 100 * (1 - sum(b["tokens"] for b in batches) / sum(b["padded"] for b in batches))
        summary["tokens_per_step"] = sum(b["tokens"] for b in batches) / len(batches)
    return summary


def report(results: list[dict], args) -> None:
    header = ["side", "steps", "tokens/step", "padding %", "tokens/s", "loop tokens/s", "median s/step",
              "peak RSS MB", "wall s"]
    rows, summaries = [], {}
    for result in results:
        s = summaries[result["side"]] = summarise(result, args.batch_size)
        rows.append([result["side"], result.get("steps", "failed"), s.get("tokens_per_step", float("nan")),
                     s["padding"], s["tokens_per_s"], result.get("loop_tokens_per_s", float("nan")),
                     s["median_step_s"], result["peak_rss_mb"], result["wall_s"]])
    if len(results) == 2:
        a, b = results
        sa, sb = summaries[a["side"]], summaries[b["side"]]
        rows.append(["instruct / TRL", "", common.ratio(sa.get("tokens_per_step"), sb.get("tokens_per_step")),
                     "", common.ratio(sa["tokens_per_s"], sb["tokens_per_s"]),
                     common.ratio(a.get("loop_tokens_per_s"), b.get("loop_tokens_per_s")),
                     common.ratio(sa["median_step_s"], sb["median_step_s"]),
                     common.ratio(a["peak_rss_mb"], b["peak_rss_mb"]), common.ratio(a["wall_s"], b["wall_s"])])
    common.print_table(
        f"SFT: {args.max_steps} steps x {args.batch_size} rows, max length {args.max_length}, "
        f"quantization {args.quantization}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, LoRA r=16 alpha=32 all-linear", header, rows)
    print("tokens/s: non-pad tokens of steps 2..N-1 / time from the end of step 1 to the end of step N-1.\n"
          "loop tokens/s: all N steps, as each side reports it (instruct: metrics.jsonl train/tokens_per_s; TRL: "
          "non-pad tokens / time from on_train_begin to the end of step N).\n"
          "padding: share of batch positions that are padding (instruct batches by length; TRL samples at random).\n"
          "peak RSS: max resident memory of the side's process; wall: the whole process, loading included.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_model_flags(parser)
    parser.add_argument("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return
    if args.only != "instruct":
        common.ensure_trl()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        model = common.default_model(work, args)
        raw = common.write_jsonl(work / "raw-sft.jsonl", common.sft_rows(args.rows, args.seed))
        data = common.prepare_data(raw, work / "data-sft", "sft", model, common.base_env(work))
        results = []
        if args.only != "trl":
            results.append(run_instruct(model, data, work, args))
        if args.only != "instruct":
            results.append(run_trl(model, data, work, args))
        report(results, args)
        print(f"[bench] done in {time.time() - started:.0f} s; work folder {work}"
              + ("" if args.keep or args.work else " (removed)"))
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
