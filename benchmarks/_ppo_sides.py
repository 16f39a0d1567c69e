"""bench_ppo's sides: the inputs every side trains from (synthetic questions -> prepare-data -> short sft and
rm runs, reused from the work folder), and each side run in its own measured process -- the import baseline,
the real `instruct ppo` CLI (per --variants), one trajectory with the shared or the four-model design (a child
of bench_ppo.py, see _ppo_child.py) -- plus the optional cProfile of the CLI."""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

from common import INSTRUCT, PYTHON, read_jsonl, run_checked, run_measured, write_jsonl

SCRIPT = Path(__file__).resolve().with_name("bench_ppo.py")
"""What the children run (with --child)."""

READY = re.compile(r"ppo: \d+ prompts")
"""The CLI's line once the roles are loaded."""


@dataclass(frozen=True)
class Bench:
    """What every side of one benchmark run shares: the work folder, the model (a reference the CLI takes),
    the environment of every side (--threads, --env) and the flags."""

    work: Path
    model: str
    env: dict[str, str]
    args: argparse.Namespace

    @property
    def logs(self) -> Path:
        return self.work / "logs"


def measure(bench: Bench, cmd: list[str], log: Path, label: str) -> dict:
    """Run `cmd` in its own measured process (peak RSS exact, peak PSS sampled every second); returns rc, wall s,
    cpu s, peak RSS MB, and `ready_s`: seconds from the launch to the first output line matching READY (the
    CLI's 'ppo: N prompts ...' line, printed once the roles are loaded). Output goes to `log`, each line
    prefixed with its time since launch."""
    print(f"[bench] {label}: $ {' '.join(cmd)}", flush=True)
    result = run_measured(cmd, bench.env, log, label, sample_every=1.0, ready=READY)
    result.update(label=label, log=str(log))
    return result


SUBJECTS = [
    "the moon",
    "a volcano",
    "photosynthesis",
    "the ocean",
    "a rainbow",
    "gravity",
    "a bicycle",
    "bread",
    "the heart",
    "a compass",
    "electricity",
    "snow",
    "a library",
    "the internet",
    "bees",
    "a clock",
]
QUESTIONS = ["What is {}?", "Why does {} matter?", "How does {} work?", "Give one fact about {}."]


def questions(count: int, seed: int) -> list[str]:
    """`count` short questions (16 subjects x 4 templates, shuffled)."""
    items = [template.format(subject) for subject in SUBJECTS for template in QUESTIONS]
    random.Random(seed).shuffle(items)
    return (items * (count // len(items) + 1))[:count]


def build_inputs(bench: Bench) -> dict[str, Path]:
    """Data folders and short sft / rm runs in the work folder, reused when already complete."""
    work, model = bench.work, bench.model
    paths = {name: work / name for name in ("prompts", "sft-data", "prefs-data", "sft", "rm")}
    if (
        all((paths[name] / "manifest.json").is_file() for name in paths)
        and json.loads((paths["rm"] / "manifest.json").read_text()).get("status") == "complete"
    ):
        print(f"[bench] reusing the inputs in {work}", flush=True)
        return paths
    asked = questions(bench.args.prompts, bench.args.seed)
    good = "Here is a short, clear answer about that, with one concrete example."
    bad = "No."
    raw_prompts = write_jsonl(work / "raw-prompts.jsonl", [{"prompt": q} for q in asked])
    raw_sft = write_jsonl(work / "raw-sft.jsonl", [{"prompt": q, "completion": good} for q in asked])
    raw_prefs = write_jsonl(work / "raw-prefs.jsonl", [{"prompt": q, "chosen": good, "rejected": bad} for q in asked])
    logs = work / "logs"
    for raw, folder, task in (
        (raw_prompts, paths["prompts"], "prompts"),
        (raw_sft, paths["sft-data"], "sft"),
        (raw_prefs, paths["prefs-data"], "prefs"),
    ):
        run_checked(
            [INSTRUCT, "prepare-data", "-i", str(raw), "-o", str(folder), "--task", task, "--model", model, "--force"],
            logs / f"prepare-{task}.log",
            bench.env,
        )
    run_checked(
        [
            INSTRUCT,
            "sft",
            "--model",
            model,
            "--data",
            str(paths["sft-data"]),
            "--out",
            str(paths["sft"]),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--force",
        ],
        logs / "sft.log",
        bench.env,
    )
    run_checked(
        [
            INSTRUCT,
            "rm",
            "--model",
            str(paths["sft"]),
            "--data",
            str(paths["prefs-data"]),
            "--out",
            str(paths["rm"]),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--force",
        ],
        logs / "rm.log",
        bench.env,
    )
    return paths


# ----------------------------------------------------------------------------------------------- sides
def ppo_flags(args) -> dict:
    """The PPO shape shared by every side."""
    return {
        "rollout_batch_size": args.rollout_batch_size,
        "minibatch_size": args.minibatch_size,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }


def side_baseline(bench: Bench, what: str = "baseline") -> dict:
    """A child that only imports torch + transformers (`baseline`), or also peft, bitsandbytes and
    instruct_cli (`libraries`, for information)."""
    cmd = [PYTHON, str(SCRIPT), "--child", what, "--work", str(bench.work)]
    return measure(bench, cmd, bench.logs / f"{what}.log", what)


VARIANTS = {"default": [], "unmerged": ["--no-merged-rollouts"], "padded": ["--no-packing"]}
"""The CLI runs --variants can compare: ppo as it runs by default, and with one speed-up switched off."""


def ppo_cli_args(paths: dict, out: Path, quantization: str, args, variant: str = "default") -> list[str]:
    """`ppo` and its flags, the same for the measured and the profiled CLI run, plus the `variant`'s
    (VARIANTS)."""
    return [
        "ppo",
        "--sft",
        str(paths["sft"]),
        "--reward",
        str(paths["rm"]),
        "--data",
        str(paths["prompts"]),
        "--out",
        str(out),
        "--force",
        "--quantization",
        quantization,
        "--iterations",
        str(args.iterations),
        "--rollout-batch-size",
        str(args.rollout_batch_size),
        "--minibatch-size",
        str(args.minibatch_size),
        "--ppo-epochs",
        str(args.ppo_epochs),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
        "--seed",
        str(args.seed),
        *VARIANTS[variant],
        *shlex.split(args.ppo_args),
    ]


def side_cli(bench: Bench, paths: dict, quantization: str, variant: str = "default") -> dict:
    """The real `instruct ppo` command (as `variant` of VARIANTS); samples/s from its metrics.jsonl."""
    args = bench.args
    suffix = "" if variant == "default" else f"-{variant}"
    out = bench.work / f"ppo-{quantization}{suffix}"
    cmd = [INSTRUCT, *ppo_cli_args(paths, out, quantization, args, variant)]
    result = measure(bench, cmd, bench.logs / f"cli-{quantization}{suffix}.log", f"instruct ppo ({variant})")
    if result["rc"] == 0 and (out / "metrics.jsonl").is_file():
        rows = read_jsonl(out / "metrics.jsonl")
        result["samples_per_s"] = rows[-1].get("train/samples_per_s")
        # steady state: iterations 2..N-1 (the last row is written after the final evaluation)
        if len(rows) >= 3:
            seconds = rows[-2]["time"] - rows[0]["time"]
            result["steady_samples_per_s"] = args.rollout_batch_size * (len(rows) - 2) / seconds
        result["iteration_s"] = [round(b["time"] - a["time"], 1) for a, b in zip(rows, rows[1:])]
        result["first_row_s"] = rows[0]["time"]
        result["response_length"] = [row.get("response/length") for row in rows]
        # per-phase seconds of an iteration (instruct's own time/* metrics), median over the iterations
        result["phases"] = {
            name: statistics.median(row[name] for row in rows if name in row)
            for name in PHASES
            if any(name in row for row in rows)
        }
    return result


PHASES = ("time/rollout", "time/score", "time/logprobs", "time/update", "time/eval", "time/iteration",
          "rollout/tokens_per_s")  # fmt: skip


def side_one_step(bench: Bench, paths: dict, quantization: str, design: str) -> dict:
    """One trajectory with the shared (`shared`) or four-model (`separate`) design, in a child process."""
    spec = {
        "design": design,
        "model": bench.model,  # the base the separate design loads four times
        "quantization": quantization,
        "sft": str(paths["sft"]),
        "reward": str(paths["rm"]),
        "data": str(paths["prompts"]),
        **ppo_flags(bench.args),
        "result": str(bench.logs / f"{design}-{quantization}.result.json"),
    }
    spec_file = bench.logs / f"{design}-{quantization}.spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    result = measure(
        bench,
        [PYTHON, str(SCRIPT), "--child", str(spec_file), "--work", str(bench.work)],
        bench.logs / f"{design}-{quantization}.log",
        f"{design} (1 trajectory)",
    )
    if result["rc"] == 0:
        result.update(json.loads(Path(spec["result"]).read_text()))
        result["ready_s"] = result["ready_s_child"]
    return result


def cli_profile(bench: Bench, paths: dict, quantization: str) -> None:
    """`instruct ppo` under cProfile (slower; not part of the table): the top functions by own time."""
    import pstats

    prof = bench.work / f"ppo-{quantization}.prof"
    out = bench.work / f"ppo-{quantization}-profile"
    cmd = [
        PYTHON,
        "-m",
        "cProfile",
        "-o",
        str(prof),
        "-m",
        "instruct_cli",
        *ppo_cli_args(paths, out, quantization, bench.args),
    ]
    run_checked(cmd, bench.logs / f"profile-{quantization}.log", bench.env)
    print(f"\ncProfile of `instruct ppo --quantization {quantization}` (top 25 by cumulative time):")
    pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
    print("\n... and top 20 by own time:")
    pstats.Stats(str(prof)).sort_stats("tottime").print_stats(20)
