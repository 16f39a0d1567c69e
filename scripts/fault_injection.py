"""Kill -9 at random moments, resume, and check the result is the uninterrupted run's.

    .venv/bin/python scripts/fault_injection.py --kills 20            # sft, rm, ppo and run, 20 kills in all
    .venv/bin/python scripts/fault_injection.py --kills 6 --commands ppo --seed 3

For each trial a real `instruct sft|rm|ppo|run` on a tiny random model is started, SIGKILLed at a moment
drawn from the seed (while loading, in a step, right after an eval, while a checkpoint is written, during
the final save), then run again with --resume (`instruct run` resumes by itself). The trial is exact when
the final adapters (and PPO's value adapter and head) equal the uninterrupted run's within 1e-5, the
metrics log has exactly one row per step, the manifest is complete and no temporary file is left. It ends
with "N kills, N exact resumes" and exits non-zero if any trial was not exact.
tests/test_fault_injection.py runs a few seeded trials of the same harness in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MOMENTS = ("load", "step", "eval", "checkpoint", "final")
TEMPORARY = (".*.tmp", "**/.*.tmp", "**/*.pt.tmp", "**/.*.old")


@dataclass
class Workspace:
    """What the commands read: a tiny model, data folders, an sft and an rm run, made once."""

    root: Path
    model: Path
    data: dict[str, Path]
    sft: Path
    rm: Path


def instruct(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m instruct_cli ARGS` to the end."""
    result = subprocess.run([sys.executable, "-m", "instruct_cli", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"instruct {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def make_workspace(root: Path) -> Workspace:
    """The tiny model, its data folders (from examples/data) and the sft and rm runs the later steps need."""
    from instruct_cli.core.tiny import build_tiny_model

    examples = Path(__file__).resolve().parents[1] / "examples" / "data"
    model = build_tiny_model(root / "model")
    data = {}
    for task, name in (("sft", "demonstrations"), ("prefs", "preferences"), ("prompts", "prompts")):
        data[task] = root / f"data-{task}"
        instruct("prepare-data", "-i", examples / f"{name}.jsonl", "--task", task, "--model", model, "-o", data[task])
    workspace = Workspace(root, model, data, root / "sft", root / "rm")
    instruct(*command_args("sft", workspace, workspace.sft))
    instruct(*command_args("rm", workspace, workspace.rm))
    return workspace


def command_args(command: str, ws: Workspace, out: Path) -> list[str]:
    """The arguments of one trial's command (small, with dropout and periodic checkpoints and evals)."""
    common = ["--quantization", "none", "--no-gradient-checkpointing", "--save-every", "3", "--eval-every", "4"]
    long = ["--max-steps", "40", "--save-every", "7", "--eval-every", "9"]  # tiny steps take milliseconds
    if command == "sft":
        return ["sft", "--model", ws.model, "--data", ws.data["sft"], "--out", out, *common, *long,
                "--batch-size", "4", "--lora-dropout", "0.1", "--keep", "best", "--lr", "3e-3"]  # fmt: skip
    if command == "rm":
        return ["rm", "--model", ws.sft, "--data", ws.data["prefs"], "--out", out, *common, *long,
                "--batch-size", "4", "--lora-dropout", "0.1", "--lr", "3e-3"]  # fmt: skip
    if command == "ppo":
        return ["ppo", "--sft", ws.sft, "--reward", ws.rm, "--data", ws.data["prompts"], "--out", out, *common,
                "--iterations", "7", "--rollout-batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "2",
                "--max-new-tokens", "10", "--eval-prompts", "3", "--target-kl", "2", "--lr", "1e-3"]  # fmt: skip
    if command == "run":
        return ["run", write_recipe(ws, out)]
    raise ValueError(command)


def write_recipe(ws: Workspace, out: Path) -> Path:
    """A recipe whose steps write under `out`: sft then ppo, from the workspace's data and rm run."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    recipe = {
        "version": 1,
        "model": {"base": str(ws.model), "quantization": "none", "lora_dropout": 0.0},
        "sft": {
            "data": str(ws.data["sft"]),
            "out": "sft",
            "max_steps": 6,
            "batch_size": 4,
            "save_every": 2,
            "gradient_checkpointing": False,
        },  # fmt: skip
        "ppo": {
            "sft": "sft",
            "reward": str(ws.rm),
            "data": str(ws.data["prompts"]),
            "out": "ppo",
            "iterations": 4,
            "rollout_batch_size": 4,
            "minibatch_size": 2,
            "ppo_epochs": 1,
            "max_new_tokens": 8,
            "save_every": 2,
            "eval_every": 2,
            "eval_prompts": 2,
            "gradient_checkpointing": False,
        },  # fmt: skip
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_folders(command: str, out: Path) -> list[Path]:
    """The run folders a command writes (`run` writes one per step)."""
    return [out / "sft", out / "ppo"] if command == "run" else [out]


# ------------------------------------------------------------------------------------------- killing
def kill_at(process: subprocess.Popen, folders: list[Path], moment: str, rng: random.Random) -> str:
    """Wait for `moment` in the run (or for the process to end), then SIGKILL it; says what happened."""
    started = time.time()
    target_rows = rng.randint(1, 8)
    delay = rng.uniform(0.0, 0.3)

    def rows() -> int:
        return sum(
            len((f / "metrics.jsonl").read_text().splitlines()) for f in folders if (f / "metrics.jsonl").is_file()
        )

    def happened() -> bool:
        if moment == "load":  # the folder is opened, the model is loading
            return (folders[0] / "manifest.json").is_file()
        if moment == "step":
            return rows() >= target_rows
        if moment == "eval":
            return any(
                "eval/" in line
                for f in folders
                if (f / "metrics.jsonl").is_file()
                for line in (f / "metrics.jsonl").read_text().splitlines()
            )
        if moment == "checkpoint":
            return any(list((f / "checkpoints").glob("*.pt*")) for f in folders if (f / "checkpoints").is_dir())
        return any(list(f.glob(".adapter.*")) or (f / "adapter").is_dir() for f in folders)  # final save

    while process.poll() is None and time.time() - started < 600:
        if happened():
            time.sleep(delay if moment != "checkpoint" else 0.0)
            break
        time.sleep(0.01)
    if process.poll() is not None:
        return f"{moment}: the run ended first"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return f"{moment}: killed after {time.time() - started:.1f} s, {rows()} metric rows"


# ------------------------------------------------------------------------------------------ checking
def compare(command: str, straight: Path, resumed: Path) -> list[str]:
    """What differs between an uninterrupted run and a killed-and-resumed one (empty when exact)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for a_folder, b_folder in zip(run_folders(command, straight), run_folders(command, resumed)):
        manifest = json.loads((b_folder / "manifest.json").read_text())
        if manifest.get("status") != "complete":
            problems.append(f"{b_folder.name}: status {manifest.get('status')}")
        a_rows = [json.loads(line)["step"] for line in (a_folder / "metrics.jsonl").read_text().splitlines()]
        b_rows = [json.loads(line)["step"] for line in (b_folder / "metrics.jsonl").read_text().splitlines()]
        if a_rows != b_rows:
            problems.append(f"{b_folder.name}: metric steps {b_rows}, uninterrupted {a_rows}")
        left = sorted(str(p.relative_to(b_folder)) for pattern in TEMPORARY for p in b_folder.glob(pattern))
        if left:
            problems.append(f"{b_folder.name}: temporary files left: {left}")
        for sub in ("adapter", "value"):
            if not (a_folder / sub).is_dir():
                continue
            for name in ("adapter_model.safetensors", "score_head.safetensors"):
                if not (a_folder / sub / name).is_file():
                    continue
                a, b = load_file(a_folder / sub / name), load_file(b_folder / sub / name)
                worst = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")
                if not worst <= 1e-5 or not all(torch.isfinite(b[k]).all() for k in b):
                    problems.append(f"{b_folder.name}/{sub}/{name}: differs by {worst:.2e}")
    return problems


def trial(command: str, ws: Workspace, straight: Path, seed: int, moment: str | None = None) -> tuple[bool, str]:
    """One kill and resume of `command`; returns (exact, a line saying what happened)."""
    rng = random.Random(seed)
    moment = moment or rng.choice(MOMENTS)
    out = ws.root / f"{command}-{moment}-{seed}"
    args = command_args(command, ws, out)
    process = subprocess.Popen(
        [sys.executable, "-m", "instruct_cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    what = kill_at(process, run_folders(command, out), moment, rng)
    resume = args if command == "run" else [*args, "--resume"]
    result = instruct(*resume, check=False)
    if result.returncode != 0:
        return False, f"{command} {what}; resume failed: {result.stderr.strip().splitlines()[-1:]}"
    problems = compare(command, straight, out)
    return not problems, f"{command} {what}; " + ("exact" if not problems else "; ".join(problems))


def straight_runs(ws: Workspace, commands: list[str]) -> dict[str, Path]:
    """The uninterrupted run of each command, to compare against."""
    runs = {}
    for command in commands:
        runs[command] = ws.root / f"{command}-straight"
        instruct(*command_args(command, ws, runs[command]))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="How many kill-and-resume trials, over the commands.")
    parser.add_argument("--commands", default="sft,rm,ppo,run", help="Comma-separated: sft, rm, ppo, run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    commands = args.commands.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("INSTRUCT_CACHE", str(Path(tmp) / "cache"))
        ws = make_workspace(Path(tmp))
        straight = straight_runs(ws, commands)
        exact = 0
        for number in range(args.kills):
            command = commands[number % len(commands)]
            ok, line = trial(command, ws, straight[command], seed=args.seed * 1000 + number)
            exact += ok
            print(("ok   " if ok else "FAIL ") + line, flush=True)
    print(f"{args.kills} kills, {exact} exact resumes")
    return 0 if exact == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
