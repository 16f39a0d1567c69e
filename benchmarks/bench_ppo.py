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
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import INSTRUCT, PYTHON, fmt, print_table, ratio, read_jsonl, write_jsonl  # noqa: E402

MODEL = os.environ.get("BENCH_PPO_MODEL", "smollm2-135m")  # --smoke points it at a tiny model
ROLES = ("policy", "reference", "value", "reward")

# Runs the command as its only child, so RUSAGE_CHILDREN is that command's alone (the benchmark's own
# process runs several sides, and its RUSAGE_CHILDREN would be the largest of them all).
_WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]

def rollup(pid):
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Anonymous"):
                    values[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return values

start = time.perf_counter()
process = subprocess.Popen(cmd)
peaks = {}
while process.poll() is None:
    for key, value in rollup(process.pid).items():
        peaks[key] = max(peaks.get(key, 0.0), value)
    time.sleep(1.0)  # reading smaps_rollup walks the page tables: not free on 2 cores
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as handle:
    json.dump({"rc": process.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
               "cpu_s": usage.ru_utime + usage.ru_stime, "sampled_peak_pss_mb": peaks.get("Pss"),
               "sampled_peak_anon_mb": peaks.get("Anonymous")}, handle)
"""

# ------------------------------------------------------------------------------------------- helpers
THREADS = 0  # --threads; 0 leaves torch's default (one thread per core)
EXTRA_ENV: dict[str, str] = {}  # --env KEY=VALUE


def bench_env() -> dict[str, str]:
    """Offline, no tokenizer threads, unbuffered, and --threads if given. The instruct cache (~/.cache/instruct
    or $INSTRUCT_CACHE) is shared with normal use, so the GGUF conversion and 4-bit cache are paid once."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "WANDB_DISABLED": "true",
        }
    )
    if THREADS:
        env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)})
    env.update(EXTRA_ENV)
    return env


def run_checked(cmd: list[str], log: Path) -> None:
    """Run a set-up command (not measured); stop the benchmark with its log tail if it fails."""
    print(f"[bench] $ {' '.join(cmd)}", flush=True)
    with open(log, "w") as handle:
        done = subprocess.run(cmd, env=bench_env(), stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"[bench] failed (exit {done.returncode}); last lines of {log}:\n{tail}")


def measure(cmd: list[str], log: Path, label: str) -> dict:
    """Run `cmd` under the wrapper; returns rc, wall s, cpu s, peak RSS MB, and `ready_s`: seconds from the
    launch to the first output line matching READY (the CLI's 'ppo: N prompts ...' line, printed once the
    roles are loaded). Output goes to `log`, each line prefixed with its time since launch."""
    result_file = log.with_suffix(".rusage.json")
    print(f"[bench] {label}: $ {' '.join(cmd)}", flush=True)
    launched = time.time()
    env = {**bench_env(), "BENCH_LAUNCHED": repr(launched)}
    ready_s = None
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(result_file), *cmd],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for line in process.stdout:
            elapsed = time.time() - launched
            handle.write(f"[{elapsed:7.1f}s] {line}")
            handle.flush()
            if ready_s is None and READY.search(line):
                ready_s = elapsed
        process.wait()
    result = json.loads(result_file.read_text())
    result.update(label=label, log=str(log), ready_s=ready_s)
    if result["rc"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"[bench] {label} FAILED (exit {result['rc']}); last lines of {log}:\n{tail}", flush=True)
    return result


READY = re.compile(r"ppo: \d+ prompts")


def memory_status() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, in MB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, amount = line.split(":")
            values[key] = int(amount.split()[0]) / 1024
    return values


# ---------------------------------------------------------------------------------------------- inputs
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


def build_inputs(work: Path, prompts: int, seed: int) -> dict[str, Path]:
    """Data folders and short sft / rm runs in `work`, reused when already complete."""
    paths = {name: work / name for name in ("prompts", "sft-data", "prefs-data", "sft", "rm")}
    if (
        all((paths[name] / "manifest.json").is_file() for name in paths)
        and json.loads((paths["rm"] / "manifest.json").read_text()).get("status") == "complete"
    ):
        print(f"[bench] reusing the inputs in {work}", flush=True)
        return paths
    asked = questions(prompts, seed)
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
            [INSTRUCT, "prepare-data", "-i", str(raw), "-o", str(folder), "--task", task, "--model", MODEL, "--force"],
            logs / f"prepare-{task}.log",
        )
    run_checked(
        [
            INSTRUCT,
            "sft",
            "--model",
            MODEL,
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


def side_baseline(work: Path, what: str = "baseline") -> dict:
    """A child that only imports torch + transformers (`baseline`), or also peft, bitsandbytes and
    instruct_cli (`libraries`, for information)."""
    return measure([PYTHON, __file__, "--child", what, "--work", str(work)], work / "logs" / f"{what}.log", what)


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


def side_cli(paths: dict, work: Path, quantization: str, args, variant: str = "default") -> dict:
    """The real `instruct ppo` command (as `variant` of VARIANTS); samples/s from its metrics.jsonl."""
    suffix = "" if variant == "default" else f"-{variant}"
    out = work / f"ppo-{quantization}{suffix}"
    cmd = [INSTRUCT, *ppo_cli_args(paths, out, quantization, args, variant)]
    result = measure(cmd, work / "logs" / f"cli-{quantization}{suffix}.log", f"instruct ppo ({variant})")
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


def side_one_step(paths: dict, work: Path, quantization: str, design: str, args) -> dict:
    """One trajectory with the shared (`shared`) or four-model (`separate`) design, in a child process."""
    spec = {
        "design": design,
        "quantization": quantization,
        "sft": str(paths["sft"]),
        "reward": str(paths["rm"]),
        "data": str(paths["prompts"]),
        **ppo_flags(args),
        "result": str(work / "logs" / f"{design}-{quantization}.result.json"),
    }
    spec_file = work / "logs" / f"{design}-{quantization}.spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    result = measure(
        [PYTHON, __file__, "--child", str(spec_file), "--work", str(work)],
        work / "logs" / f"{design}-{quantization}.log",
        f"{design} (1 trajectory)",
    )
    if result["rc"] == 0:
        result.update(json.loads(Path(spec["result"]).read_text()))
        result["ready_s"] = result["ready_s_child"]
    return result


def cli_profile(paths: dict, work: Path, quantization: str, args) -> None:
    """`instruct ppo` under cProfile (slower; not part of the table): the top functions by own time."""
    import pstats

    prof = work / f"ppo-{quantization}.prof"
    out = work / f"ppo-{quantization}-profile"
    cmd = [
        PYTHON,
        "-m",
        "cProfile",
        "-o",
        str(prof),
        "-m",
        "instruct_cli",
        *ppo_cli_args(paths, out, quantization, args),
    ]
    run_checked(cmd, work / "logs" / f"profile-{quantization}.log")
    print(f"\ncProfile of `instruct ppo --quantization {quantization}` (top 25 by cumulative time):")
    pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
    print("\n... and top 20 by own time:")
    pstats.Stats(str(prof)).sort_stats("tottime").print_stats(20)


# ----------------------------------------------------------------------------------------- the children
def child_baseline(everything: bool) -> None:
    """Import torch and transformers (resolving the lazy model classes); with `everything`, also the other
    libraries every side imports."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if everything:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401

        from instruct_cli.steps import ppo  # noqa: F401
    print(json.dumps(memory_status()), flush=True)


class SeparateRoles:
    """Four separate models behind the interface `ppo.make_trajectory` uses: `use(role)` picks a model
    instead of an adapter, so the shared and separate one-step sides run the very same code."""

    def __init__(self, role_models: dict, value_head, reward_head, reward_gain: float, reward_bias: float):
        self.models = role_models
        self.model = role_models["policy"]
        self.value_head = value_head
        self.reward_head = reward_head
        self.reward_gain = reward_gain
        self.reward_bias = reward_bias

    has_value = True
    has_reward_model = True

    @property
    def device(self):
        """Where the inputs go (the value head sits with the models)."""
        return self.value_head.weight.device

    def use(self, role: str) -> None:
        self.model = self.models[role]

    @property
    def merge_blocker(self):
        """Why the policy model cannot be folded for sampling (as `Roles.merge_blocker`), or None."""
        from instruct_cli.core import lora_merge

        return lora_merge.merge_blocker(self.models["policy"])


def load_separate(config, device):
    """Four full models, one per role, as a four-model PPO would hold them; trainable roles (policy, value)
    are prepared for training exactly as `load_roles` prepares the shared base."""
    from peft import PeftModel

    from instruct_cli.core import artifacts, heads, models, training
    from instruct_cli.steps import ppo

    source = models.resolve_model(str(config.sft), flag="--sft")
    rm_manifest = artifacts.require_complete(config.reward, "rm", flag="--reward")
    tokenizer = models.load_tokenizer(source)
    sft_adapter, rm_adapter = str(source.adapter), str(Path(config.reward) / models.ADAPTER_DIR)
    role_models = {}
    for role in ROLES:
        trainable = role in ("policy", "value")
        base = models.load_base_model(models.resolve_model(MODEL), config.quantization, device)
        if trainable:
            base = training.prepare_for_training(base, config.quantization, config.gradient_checkpointing)
        adapter = sft_adapter if role in ("policy", "reference") else rm_adapter
        model = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
        ppo.disable_dropout(model)
        if not trainable:
            model.eval()
        role_models[role] = model
    value_head = heads.load_head(rm_adapter).to(device)
    reward_head = heads.load_head(rm_adapter).to(device).requires_grad_(False)
    norm = rm_manifest.get("reward_normalization") or {"gain": 1.0, "bias": 0.0}
    return SeparateRoles(role_models, value_head, reward_head, norm["gain"], norm["bias"]), tokenizer


def child_one_step(spec_file: str) -> None:
    """Load the roles (shared or separate), run one trajectory, write timings and memory as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    from instruct_cli.core.console import quiet_libraries

    quiet_libraries()
    import torch

    from instruct_cli.core import data_folders, models, training
    from instruct_cli.core.chat import encode_prompt
    from instruct_cli.core.config import PPOConfig
    from instruct_cli.core.recipes import build_config
    from instruct_cli.steps import ppo

    config = build_config(
        PPOConfig,
        "ppo",
        None,
        {
            "sft": spec["sft"],
            "reward": spec["reward"],
            "data": spec["data"],
            "quantization": spec["quantization"],
            "rollout_batch_size": spec["rollout_batch_size"],
            "minibatch_size": spec["minibatch_size"],
            "max_new_tokens": spec["max_new_tokens"],
            "seed": spec["seed"],
        },
    )
    device = models.pick_device(config.device)
    after_imports = memory_status()
    start = time.perf_counter()
    if spec["design"] == "shared":
        roles, tokenizer, _, _ = ppo.load_roles(config, device)
    else:
        roles, tokenizer = load_separate(config, device)
    load_s = time.perf_counter() - start
    ready_s = time.time() - float(os.environ["BENCH_LAUNCHED"])
    after_load = memory_status()
    print(f"ready after {ready_s:.1f} s (roles loaded in {load_s:.1f} s)", flush=True)

    prompts = data_folders.read_prompts(config.data, "train")  # the CLI's first rollout batch
    accelerator = training.make_accelerator(config.seed, config.precision, config.device)
    batch = [encode_prompt(tokenizer, prompts[i]) for i in ppo.iteration_prompts(len(prompts), config, 0, accelerator)]
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    rollout = ppo.rollout(roles, tokenizer, batch, config, accelerator)
    trajectory, stats = ppo.make_trajectory(roles, rollout, config, config.kl_coef, accelerator)
    step_s = time.perf_counter() - start
    result = {
        "load_s": load_s,
        "ready_s_child": ready_s,
        "step_s": step_s,
        "samples_per_s": config.rollout_batch_size / step_s,
        "response_tokens": int(trajectory.response_mask.sum()),
        "response_shape": list(trajectory.response.shape),
        "rss_after_imports_mb": after_imports["VmRSS"],
        "rss_after_load_mb": after_load["VmRSS"],
        "vmhwm_mb": memory_status()["VmHWM"],
        "stats": stats,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- report
def report(quantization: str, baseline: dict, sides: dict[str, dict], args) -> dict:
    """The table of one quantization and its ratios; returns {side: {"raw": .., "net": .., "pss": ..}}."""
    base_rss, base_pss = baseline["peak_rss_mb"], baseline.get("sampled_peak_pss_mb") or 0.0
    header = [
        "side",
        "peak RSS MB",
        "net RSS MB",
        "peak PSS MB",
        "net PSS MB",
        "ready s",
        "load s",
        "samples/s",
        "timed",
        "wall s",
    ]
    timed = {
        "cli": f"{args.iterations} it. x {args.rollout_batch_size}, full PPO",
        "shared": "1 trajectory",
        "separate": "1 trajectory",
    }
    names = {
        "cli": "instruct ppo (CLI)",
        "shared": "shared base, 1 trajectory",
        "separate": "4 separate models, 1 trajectory",
    }
    short = {"cli": "CLI run / separate", "shared": "shared / separate"}
    rows = []
    for key, result in sides.items():
        ok = result.get("rc") == 0
        pss = result.get("sampled_peak_pss_mb")
        rows.append(
            [
                names[key],
                result["peak_rss_mb"] if ok else "failed",
                result["peak_rss_mb"] - base_rss if ok else None,
                pss,
                pss - base_pss if ok and pss else None,
                result.get("ready_s"),
                result.get("load_s"),
                fmt(result.get("samples_per_s"), 3),
                timed[key],
                result["wall_s"],
            ]
        )
    ratios = {}
    separate = sides.get("separate", {})
    if separate.get("rc") == 0:
        for key in ("shared", "cli"):
            result = sides.get(key, {})
            if result.get("rc") != 0:
                continue
            ratios[key] = {
                "raw": ratio(result["peak_rss_mb"], separate["peak_rss_mb"]),
                "net": ratio(result["peak_rss_mb"] - base_rss, separate["peak_rss_mb"] - base_rss),
                "pss_net": ratio(
                    (result.get("sampled_peak_pss_mb") or 0) - base_pss,
                    (separate.get("sampled_peak_pss_mb") or 0) - base_pss,
                ),
            }
            rows.append(
                [
                    short[key],
                    f"x{ratios[key]['raw']:.2f}",
                    f"x{ratios[key]['net']:.2f}",
                    "",
                    f"x{fmt(ratios[key]['pss_net'], 2)}",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
    print_table(
        f"PPO memory and speed, quantization {quantization} (model {MODEL}, rollouts of "
        f"{args.rollout_batch_size} prompts x {args.max_new_tokens} new tokens; net = minus the "
        f"torch+transformers baseline: RSS {base_rss:.0f} MB, PSS {base_pss:.0f} MB)",
        header,
        rows,
    )
    cli = sides.get("cli", {})
    if cli.get("rc") == 0:
        print(
            f"  CLI: steady samples/s (iterations 2..N-1) {fmt(cli.get('steady_samples_per_s'), 3)}; seconds "
            f"between metric rows {cli.get('iteration_s')} (the last includes the final evaluation); "
            f"mean response length per iteration {[fmt(x) for x in cli.get('response_length', [])]}"
        )
        if cli.get("phases"):
            print(
                "  CLI per-phase median over iterations: "
                + ", ".join(f"{name} {fmt(value, 2)}" for name, value in cli["phases"].items())
            )
    for key in ("shared", "separate"):
        if sides.get(key, {}).get("rc") == 0:
            r = sides[key]
            print(
                f"  {names[key]}: RSS after imports {r['rss_after_imports_mb']:.0f} MB, after loading the roles "
                f"{r['rss_after_load_mb']:.0f} MB, peak {r['vmhwm_mb']:.0f} MB (VmHWM); trajectory "
                f"{r['step_s']:.1f} s for {r['response_tokens']} response tokens; score "
                f"{r['stats']['objective/score']:.4f}, entropy {r['stats']['objective/entropy']:.4f}"
            )
    return ratios


def report_variants(quantization: str, runs: dict[str, dict]) -> None:
    """The CLI runs of --variants side by side: per-phase medians over the iterations, and each variant's
    time against the default's."""
    others = [variant for variant in runs if variant != "default" and "default" in runs]
    header = ["phase (median over iterations)", *runs, *(f"{variant} / default" for variant in others)]
    default = runs.get("default", {}).get("phases", {})
    rows = []
    for name in PHASES:
        values = [run.get("phases", {}).get(name) for run in runs.values()]
        if all(value is None for value in values):
            continue
        row = [name, *(fmt(value, 2) for value in values)]
        row += [f"x{fmt(ratio(runs[variant].get('phases', {}).get(name), default.get(name)), 2)}" for variant in others]
        rows.append(row)
    steady = [fmt(run.get("steady_samples_per_s"), 3) for run in runs.values()]
    rows.append(["steady samples/s (CLI)", *steady, *([""] * len(others))])
    print_table(
        f"instruct ppo, quantization {quantization}: default = merged rollouts and packed passes; unmerged = "
        "--no-merged-rollouts; padded = --no-packing; seconds, tokens/s",
        header,
        rows,
    )


def print_warnings(work: Path) -> None:
    """Lines of the measured logs that look like warnings or errors (deduplicated), for the reader."""
    pattern = re.compile(r"warn|error|deprecat|traceback|exception", re.IGNORECASE)
    seen: dict[str, list[str]] = {}
    for log in sorted((work / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            text = re.sub(r"^\[\s*[\d.]+s\] ", "", line).strip()
            if pattern.search(text) and '"stats"' not in text:
                seen.setdefault(text, []).append(log.name)
    if seen:
        print(f"\nWarning-like lines in the logs ({work / 'logs'}):")
        for text, logs in seen.items():
            print(f"  [{', '.join(sorted(set(logs)))}] {text[:220]}")


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
    global THREADS
    THREADS = args.threads
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env expects KEY=VALUE, got {item!r}")
        EXTRA_ENV[key] = value
    if args.child in ("baseline", "libraries"):
        child_baseline(args.child == "libraries")
        return
    if args.child:
        child_one_step(args.child)
        return

    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if args.smoke:
        global MODEL
        from instruct_cli.core.tiny import build_tiny_model

        MODEL = str(build_tiny_model(work / "tiny-model"))
        os.environ["BENCH_PPO_MODEL"] = MODEL  # the one-step children load their separate models from it
        args.quantization, args.prompts, args.iterations, args.rollout_batch_size = ["none"], 8, 2, 4
        args.minibatch_size, args.max_new_tokens, args.variants = 2, 8, list(VARIANTS)
    failed = []
    started = time.time()
    try:
        if EXTRA_ENV or THREADS:
            print(f"[bench] every side runs with {EXTRA_ENV or ''}{f' OMP_NUM_THREADS={THREADS}' if THREADS else ''}")
        print(
            f"[bench] work folder {work}; load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} "
            f"on {os.cpu_count()} cores (timings are noisy on a shared machine)",
            flush=True,
        )
        paths = build_inputs(work, args.prompts, args.seed)
        baseline = side_baseline(work)
        libraries = side_baseline(work, "libraries")
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
                cli_runs = {variant: side_cli(paths, work, quantization, args, variant) for variant in args.variants}
                sides["cli"] = cli_runs[args.variants[0]]
            for design in ("shared", "separate"):
                if design not in args.skip:
                    sides[design] = side_one_step(paths, work, quantization, design, args)
            all_ratios[quantization] = report(quantization, baseline, sides, args)
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
                cli_profile(paths, work, quantization, args)
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
