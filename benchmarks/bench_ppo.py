"""Peak memory and speed of `instruct ppo` (four LoRA roles on ONE base) against four separate models.

`instruct ppo` keeps one (4-bit) base model in memory with four LoRA adapters -- policy, reference, value,
reward -- switched with peft's `set_adapter` (instruct_cli/steps/ppo/roles.py `load_roles`). A four-model design, the
way torchtune's PPO recipe does it, holds four full models. This script measures both on the built-in model
(`smollm2-135m`, SmolLM2-135M-Instruct) on this machine.

Sides, each in its OWN subprocess, run through a small wrapper process, so that getrusage(RUSAGE_CHILDREN)
.ru_maxrss in the wrapper is the peak resident set (RSS) of that side alone (the Python children also report
VmHWM from /proc/self/status as a cross-check). The wrapper also samples the side's /proc/PID/smaps_rollup
every second for its peak PSS (proportional set size):

  baseline     a child that only imports torch + transformers: the interpreter's own footprint, subtracted
               to give the "net" columns and ratios.
  cli          the real `instruct ppo` CLI: --iterations N of --rollout-batch-size rollouts, full updates
               (optimizer state, backward passes), a final evaluation. samples/s is the run's own
               `train/samples_per_s` (last row of metrics.jsonl: all rollouts / time since the first
               iteration began, before the final evaluation); "steady" leaves out the first iteration.
               With --variants default unmerged padded it runs once per variant: as ppo runs by default,
               with rollouts sampled unmerged (--no-merged-rollouts) and with the reward, log-prob and value
               passes on padded rows (--no-packing), and prints their per-phase medians (time/rollout,
               time/logprobs, rollout/tokens_per_s, ...) side by side.
  shared-1     ONE PPO trajectory with the shared design: `ppo.load_roles` + `ppo.make_trajectory`
               (generate B x T tokens with the policy, reward score, policy + reference log-probs, values).
  separate-1   the SAME trajectory with four separate models: for each role `models.load_base_model`
               + `PeftModel.from_pretrained(base, SFT or RM adapter)`, plus the two scalar heads; the very
               same `ppo.make_trajectory` runs on them (its `roles.use(role)` switches between models instead
               of adapters), so the two one-step sides do identical work and differ only in how the roles
               are held. samples/s of the one-step sides = B / seconds of that one trajectory (rollout and
               scoring only, no update: not comparable with the CLI's samples/s).

The memory claim is checked like for like: shared-1 / separate-1 (raw, and net of the baseline). The CLI
run against separate-1 is printed too; it is conservative for the shared design, since the CLI also holds
AdamW state and backward activations which separate-1 does not.

Why PSS too: with nf4 on a CPU, `load_base_model` reads the 4-bit weights (and the fp32 embedding) from a
cached safetensors file that is memory-mapped, not copied, so four separate models map the SAME page-cache
pages four times. RSS counts such a page once per mapping (so it overstates the four-model side), PSS once
per process (the physical cost); and a page is only counted once a model touches it (the value and reward
roles never touch the tied lm_head/embedding matrix beyond the prompt's rows). With --quantization none the
bf16 checkpoint is converted to fp32 copies, so every model is private memory and RSS = physical cost.

Inputs are built once in the work folder (synthetic questions and preference pairs -> `instruct
prepare-data` -> `instruct sft` and `instruct rm` with 2 steps each: the benchmark measures PPO, not the
quality of these adapters); a later run with the same --work reuses them.

Timings are noisy: the machine has 2 cores shared with other work. Memory numbers are stable.

Code: this file holds the flags and the run; the sides are in _ppo_sides.py, what runs inside the children in
_ppo_child.py, the tables in _ppo_report.py, and what every benchmark shares in common/.

Usage:
  .venv/bin/python benchmarks/bench_ppo.py                               # nf4 (the default)
  .venv/bin/python benchmarks/bench_ppo.py --quantization nf4 none      # also the fp32 base
  .venv/bin/python benchmarks/bench_ppo.py --work /tmp/bench-ppo --profile  # + cProfile of one CLI run
  .venv/bin/python benchmarks/bench_ppo.py --quantization none --skip shared separate \
      --variants default unmerged padded --iterations 6 --max-new-tokens 48 --ppo-epochs 2  # quickstart-shaped
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ppo_child import child_baseline, child_one_step  # noqa: E402
from _ppo_report import print_warnings, report, report_variants  # noqa: E402
from _ppo_sides import VARIANTS, Bench, build_inputs, cli_profile, side_baseline, side_cli, side_one_step  # noqa: E402
from common import fmt, offline_env, print_machine_header  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
"""The model measured, unless $BENCH_PPO_MODEL names another (--smoke: a tiny one built at run time)."""


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="Folder for data, runs and logs (default: a fresh temp folder, "
        "removed at the end unless --keep); inputs already there are reused",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the temp work folder")
    parser.add_argument(
        "--quantization",
        nargs="+",
        choices=("nf4", "int8", "none"),
        default=["nf4"],
        help="Base storage(s) to measure, one table each",
    )
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations of the CLI run")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=tuple(VARIANTS),
        default=["default"],
        help="CLI runs to measure: ppo as it runs by default, with rollouts sampled unmerged "
        "(--no-merged-rollouts), with the passes on padded rows (--no-packing); several: a side-by-side "
        "per-phase table",
    )
    parser.add_argument("--rollout-batch-size", type=int, default=8, help="Prompts per rollout")
    parser.add_argument("--minibatch-size", type=int, default=4, help="Rollouts per gradient step (CLI)")
    parser.add_argument("--ppo-epochs", type=int, default=1, help="Passes over each rollout batch (CLI)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Longest sampled response")
    parser.add_argument("--prompts", type=int, default=64, help="Synthetic prompts / preference pairs")
    parser.add_argument(
        "--ppo-args",
        default="",
        help="More flags for the CLI run, e.g. '--no-gradient-checkpointing --lr 2e-4' (the quickstart's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, sampling and the CLI run")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("cli", "shared", "separate"), help="Sides to leave out"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for every side (0: torch's default). On a machine shared with other "
        "work, 1 thread may avoid the stalls of oversubscribed cores (untested here)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra environment for every side, e.g. MALLOC_MMAP_THRESHOLD_=65536 (glibc then "
        "returns freed large blocks to the system: ~30%% lower peak RSS here, but about twice as "
        "slow); repeatable",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Also run `instruct ppo` once under cProfile per quantization and print hot spots",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Every side once on a tiny model (fp32 base, 2 iterations of 4 rollouts): checks that each runs and "
        "produces its numbers; exits non-zero if one does not",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra_env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env expects KEY=VALUE, got {item!r}")
        extra_env[key] = value
    if args.child in ("baseline", "libraries"):
        child_baseline(args.child == "libraries")
        return
    if args.child:
        child_one_step(args.child)
        return

    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model = os.environ.get("BENCH_PPO_MODEL", DEFAULT_MODEL)
    if args.smoke:
        from instruct_cli.core.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny-model"))
        args.quantization, args.prompts, args.iterations, args.rollout_batch_size = ["none"], 8, 2, 4
        args.minibatch_size, args.max_new_tokens, args.variants = 2, 8, list(VARIANTS)
    # every side's environment: offline, no tokenizer threads, unbuffered, --threads and --env. The instruct
    # cache (~/.cache/instruct or $INSTRUCT_CACHE) is shared with normal use, so the 4-bit cache is paid once.
    bench = Bench(work, model, offline_env(args.threads, extra_env), args)
    failed = []
    started = time.time()
    try:
        print_machine_header()
        if extra_env or args.threads:
            threads = f" OMP_NUM_THREADS={args.threads}" if args.threads else ""
            print(f"[bench] every side runs with {extra_env or ''}{threads}")
        print(
            f"[bench] work folder {work}; load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} "
            f"on {os.cpu_count()} cores (timings are noisy on a shared machine)",
            flush=True,
        )
        paths = build_inputs(bench)
        baseline = side_baseline(bench)
        libraries = side_baseline(bench, "libraries")
        baseline_mb = baseline["peak_rss_mb"]
        print(
            f"[bench] baseline child (imports torch + transformers only): peak RSS {baseline_mb:.0f} MB, "
            f"PSS {fmt(baseline['sampled_peak_pss_mb'], 0)} MB; with peft, bitsandbytes and instruct_cli "
            f"imported too: {libraries['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        all_ratios = {}
        for quantization in args.quantization:
            sides, cli_runs = {}, {}
            if "cli" not in args.skip:
                cli_runs = {variant: side_cli(bench, paths, quantization, variant) for variant in args.variants}
                sides["cli"] = cli_runs[args.variants[0]]
            for design in ("shared", "separate"):
                if design not in args.skip:
                    sides[design] = side_one_step(bench, paths, quantization, design)
            all_ratios[quantization] = report(quantization, model, baseline, sides, args)
            if len(cli_runs) > 1:
                report_variants(quantization, cli_runs)
            failed += [
                f"{quantization} {name} (exit {side.get('rc')})" for name, side in sides.items() if side.get("rc")
            ]
            failed += [
                f"{quantization} cli, {variant} (exit {run.get('rc')})"
                for variant, run in list(cli_runs.items())[1:]
                if run.get("rc")
            ]
            if "cli" in sides and sides["cli"].get("rc") == 0 and not sides["cli"].get("phases"):
                failed.append(f"{quantization} cli (no per-phase timing in its metrics)")
            (work / f"results-{quantization}.json").write_text(
                json.dumps(
                    {
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "baseline": baseline,
                        "libraries": libraries,
                        "sides": sides,
                        "cli_variants": cli_runs,
                        "ratios": all_ratios[quantization],
                    },
                    indent=2,
                    default=str,
                )
            )
            if args.profile:
                cli_profile(bench, paths, quantization)
        print(
            "\nRatios of peak memory, shared design / four separate models (under 0.5: less than half). raw = "
            "peak RSS; net = minus the torch+transformers baseline; PSS = sampled peak proportional set size, "
            "net, which counts a file page mapped by several models once (see the module docstring):"
        )
        for quantization, ratios in all_ratios.items():
            for key, r in ratios.items():
                what = "shared, 1 trajectory" if key == "shared" else "full CLI run        "
                print(
                    f"  {quantization:>4}  {what} / separate, 1 trajectory: RSS raw {fmt(r['raw'], 2)}, "
                    f"RSS net {fmt(r['net'], 2)}, PSS net {fmt(r['pss_net'], 2)}"
                )
        print(
            "Columns: peak RSS = getrusage(RUSAGE_CHILDREN).ru_maxrss of a wrapper around the side (exact); peak "
            "PSS = largest Pss of /proc/PID/smaps_rollup sampled every second (may miss short spikes); ready s = "
            "launch to roles loaded (imports included); load s = loading the roles only; samples/s: CLI = "
            "rollouts / time since the first iteration began (its train/samples_per_s), one-step sides = "
            "rollouts / one trajectory (rollout and scoring, no update). Timings: 2 shared cores, noisy."
        )
        print_warnings(work)
        if failed:
            print("[bench] FAILED: " + "; ".join(failed), flush=True)
            raise SystemExit(1)
        print(
            f"\n[bench] done in {time.time() - started:.0f} s; logs in {work / 'logs'}"
            + ("" if args.keep or args.work else " (removed)")
        )
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
