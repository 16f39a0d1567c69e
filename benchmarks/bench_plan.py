"""Estimate vs measured: `instruct plan`'s memory model against the real peak of each step on small models.

For each step (sft, rm, ppo, eval) and setting, the script builds a random Llama at run time (the tokenizer
and chat template of `instruct_cli.core.tiny`, grouped-query attention, a realistic vocabulary), runs the step's
own code (training.load_trainable_policy + training.accumulate, rm.load_trainable_reward_model + rm.rm_loss,
ppo.make_trajectory + ppo.update on a one-base/four-adapter model built like ppo.load_roles, and the
functions `instruct eval` calls) and measures the peak memory the allocator hands out:

    measured = bytes of the model's own tensors (parameters, buffers, 4-bit quantisation state; exact)
             + peak of the running sum of every allocation and free after the model is loaded

On a CPU the allocations come from `torch.profiler` (profile_memory=True): the running sum of every
allocation and free, its peak overall and inside each labelled phase (rollout, scoring, update, perplexity,
...); on a GPU from `torch.cuda.max_memory_allocated`. The estimate is `instruct_cli.plan` for the same
shapes and settings with the device's dtypes (fp32 on a CPU). `--bf16` runs the CPU with a bf16 compute
dtype under bf16 autocast, the dtypes of a GPU, and estimates with those; it skips the runs whose residual
stream is bf16 and that take last-position logits (ppo without quantisation, eval), where torch's CPU bf16
matmul makes copies a GPU does not.

Two tables come out (markdown): per step, the model bytes and the peak above them, estimated and measured;
per phase, the transient part (what is not the model or the optimizer states) and the peak.

    .venv/bin/python benchmarks/bench_plan.py                 # sft/rm/ppo/eval x none/nf4 x ckpt (~3 min)
    .venv/bin/python benchmarks/bench_plan.py --bf16          # a GPU's dtypes, emulated on the CPU (~1 min)
    .venv/bin/python benchmarks/bench_plan.py --steps sft --quantization nf4 --hidden 256 --vocab 8192

Exit status 1 when any step's peak is off by more than --tolerance (default 20%). The measurement is in
_plan_measure.py, the steps in _plan_steps.py, what every benchmark shares in common/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _plan_steps import BENCHES  # noqa: E402
from common import build_model, print_machine_header, print_markdown  # noqa: E402


# ------------------------------------------------------------------------------------------------ main
def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default="sft,rm,ppo,eval", help="Steps to measure (comma-separated)")
    parser.add_argument("--quantization", default="none,nf4", help="none, nf4 or both (comma-separated)")
    parser.add_argument("--checkpointing", default="off,on", help="Gradient checkpointing: off, on or both")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP size (default: 2.6875 x hidden)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768, help="Vocabulary (the embedding is padded to it)")
    parser.add_argument("--batch-size", type=int, default=2, help="sft/rm rows per batch (eval: twice this)")
    parser.add_argument("--max-length", type=int, default=256, help="sft/rm sequence length")
    parser.add_argument("--rollout-batch-size", type=int, default=8)
    parser.add_argument("--minibatch-size", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=96, help="PPO prompt / eval prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="PPO / eval response tokens")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="Run with a bf16 compute dtype and bf16 autocast, "
        "as on a GPU (on a CPU: an emulation of the GPU's dtypes)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep it low on a shared box)")
    parser.add_argument("--tolerance", type=float, default=0.20)
    parser.add_argument("--work", type=Path, help="Work folder (default: a temporary one)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Every step once on a tiny model (fp32 base, checkpointing off): checks that each runs and is "
        "measured; the estimate's tolerance is not checked at these toy shapes",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.quantization, args.checkpointing, args.hidden, args.layers, args.heads = "none", "off", 64, 2, 4
        args.kv_heads, args.vocab, args.batch_size, args.max_length, args.rollout_batch_size = 2, 1024, 1, 64, 2
        args.minibatch_size, args.prompt_length, args.new_tokens, args.tolerance = 2, 16, 8, float("inf")

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keep = args.work is not None
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-plan-"))
    args.work = work
    os.environ["INSTRUCT_CACHE"] = str(work / "cache")
    from instruct_cli.core.console import quiet_libraries

    quiet_libraries()
    from instruct_cli.steps import plan

    intermediate = args.intermediate or int(round(args.hidden * 2.6875 / 16) * 16)
    folder = work / "model"
    if not (folder / "config.json").is_file():
        build_model(
            folder,
            hidden=args.hidden,
            layers=args.layers,
            intermediate=intermediate,
            heads=args.heads,
            kv_heads=args.kv_heads,
            vocab_size=args.vocab,
            scale_embedding=False,
            announce=False,
        )
    shape = plan.read_model_shape(str(folder))
    device = "cuda" if torch.cuda.is_available() else ("cpu-bf16" if args.bf16 else "cpu")
    print_machine_header()
    print(
        f"model: random Llama, hidden {shape.hidden}, {shape.layers} layers, MLP {shape.intermediate}, "
        f"{shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab} ({plan.parameter_counts(shape).total / 1e6:.1f}M "
        f"parameters); device {device}; LoRA r={args.lora_r} all-linear, dropout {args.lora_dropout}",
        flush=True,
    )
    summary, detail, worst = [], [], 0.0
    for step in [s.strip() for s in args.steps.split(",") if s.strip()]:
        for quantization in [q.strip() for q in args.quantization.split(",")]:
            for checkpointing in [c.strip() == "on" for c in args.checkpointing.split(",")]:
                if step == "eval" and checkpointing and "off" in args.checkpointing:
                    continue  # no backward in eval: checkpointing changes nothing
                if device == "cpu-bf16" and (step == "eval" or (step == "ppo" and quantization == "none")):
                    # with a bf16 residual stream the logits of the last positions (logits_to_keep) come from a
                    # sliced 3-D input, and torch's CPU bf16 matmul then expands the lm_head weight per batch row
                    # (a copy a GPU never makes): the emulation is not faithful there
                    print(f"skipped {step} {quantization} under --bf16 on a CPU (CPU-only bf16 matmul copies)")
                    continue
                started = time.time()
                measured, estimate, groups = BENCHES[step](folder, args, quantization, checkpointing, shape, device)
                error = estimate.total / measured.total - 1
                worst = max(worst, abs(error))
                label = f"{step} {quantization}"
                if step != "eval":
                    label += f" ckpt {'on' if checkpointing else 'off'}"
                loaded = estimate.weights + estimate.adapters
                summary.append(
                    (
                        label,
                        mb(loaded),
                        mb(measured.model_bytes),
                        mb(estimate.total - loaded),
                        mb(measured.peak_after_load),
                        mb(estimate.total),
                        mb(measured.total),
                        pct(error),
                        estimate.phase,
                        f"{time.time() - started:.0f}s",
                    )
                )
                print("  ".join(summary[-1]), flush=True)
                # per phase: the largest moment of the estimate there (with the gradients if they exist then)
                # against the measured peak inside the phase; "transient" leaves out the model and the optimizer
                # states, which both sides share
                static = estimate.weights + estimate.adapters + estimate.optimizer
                gradients = estimate.optimizer // 2
                for name, prefixes, moment_names in groups:
                    observed = measured.peak_in(prefixes)
                    if not observed:
                        continue
                    moment = max(
                        m.total + (gradients if m.gradients else 0) for m in estimate.moments if m.name in moment_names
                    )
                    seen = observed - measured.model_bytes - estimate.optimizer
                    detail.append(
                        (
                            label,
                            name,
                            mb(moment),
                            mb(seen),
                            pct(moment / seen - 1),
                            mb(static + moment),
                            mb(observed),
                            pct((static + moment) / observed - 1),
                        )
                    )
    print()
    print_markdown(
        (
            "step",
            "model MB est",
            "model MB meas",
            "above model MB est",
            "above model MB meas",
            "peak MB est",
            "peak MB meas",
            "error",
            "estimated peak at",
            "time",
        ),
        summary,
    )
    print()
    print_markdown(
        ("step", "phase", "transient MB est", "transient MB meas", "error", "peak MB est", "peak MB meas", "error"),
        detail,
    )
    print(f"\nworst error of a step's peak: {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%)")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
