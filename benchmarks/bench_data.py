"""Data at scale: prepare-data's rows/s and memory, and how long sft, rm, dpo and ppo take to start, at two sizes.

For each size N (--sizes, default 10,000 and 100,000 rows) the script writes N SFT conversations, N/2
preference pairs and N prompts (bench_sft's and bench_rm's random-word rows, deterministic, no network), and
runs the real CLI on them, one command at a time, each in its own process:

  * prepare-data (sft, prefs, prompts): rows read per second of the whole command, and its peak RSS;
  * sft, rm and dpo with --max-steps 1, ppo with --iterations 1, on the folders just written: seconds from the
    launch to the line announcing the training (loading, reading and encoding every row), to the end of step 1
    (when metrics.jsonl gets its first row), the whole command, and peak RSS. What rm does after
    its one step (final eval and the reward normalisation over a capped sample of responses) is the rest of
    its wall time, shown as "after step 1 s".

The eval split is kept small (--eval-fraction 0.002) so that the final evaluation of a one-step run does not
hide the start-up cost. The table ends with the growth from the first size to the last (time and peak RSS
ratios): work that grows with N shows there. Prints numbers only, never asserts a timing.

    .venv/bin/python benchmarks/bench_data.py                      # the built-in model, 10k and 100k rows
    .venv/bin/python benchmarks/bench_data.py --sizes 10000 --keep
    .venv/bin/python benchmarks/bench_data.py --smoke               # the tiny test model, 200 and 1,000 rows (CI)
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import common

STARTED = re.compile(r"^(sft|rm|dpo|ppo)\b.*(steps of|iterations of)")
"""The line each training command prints just before its first step (after reading and encoding the data)."""


def raw_inputs(work: Path, size: int, seed: int) -> dict[str, Path]:
    """The three raw JSONL files of one size: SFT conversations, preference pairs (half as many), prompts."""
    sft = common.sft_rows(size, seed)
    return {
        "sft": common.write_jsonl(work / f"raw-sft-{size}.jsonl", sft),
        "prefs": common.write_jsonl(work / f"raw-prefs-{size}.jsonl", common.preference_rows(size // 2, seed)),
        "prompts": common.write_jsonl(
            work / f"raw-prompts-{size}.jsonl", [{"prompt": row["messages"][-2]["content"]} for row in sft]
        ),
    }


def prepare(work: Path, raw: Path, task: str, size: int, model: str, rows: int) -> tuple[dict, Path]:
    """prepare-data on one raw file; (its measured row, the data folder)."""
    out = work / f"data-{task}-{size}"
    cmd = [common.INSTRUCT, "prepare-data", "-i", str(raw), "-o", str(out), "--task", task, "--model", model]
    cmd += ["--eval-fraction", "0.002", "--force"]
    result = common.run_measured(cmd, common.base_env(work), work / f"prepare-{task}-{size}.log", f"prepare {task}")
    return {"command": f"prepare-data {task}", "size": size, "rows": rows, **result}, out


def train(work: Path, step: str, data: dict[str, Path], size: int, model: str) -> dict:
    """One training command for one optimizer step (ppo: one iteration) on the folders of `data`."""
    out = work / f"{step}-{size}"
    common_flags = ["--quantization", "none", "--device", "cpu", "--out", str(out), "--force"]
    cmd = {
        "sft": ["sft", "--model", model, "--data", str(data["sft"]), "--max-steps", "1", "--eval-every", "1000"],
        "rm": ["rm", "--model", model, "--data", str(data["prefs"]), "--max-steps", "1", "--eval-every", "1000"],
        "dpo": ["dpo", "--model", model, "--data", str(data["prefs"]), "--max-steps", "1", "--eval-every", "1000"],
        "ppo": ["ppo", "--sft", str(work / f"sft-{size}"), "--reward", str(work / f"rm-{size}"), "--data",
                str(data["prompts"]), "--iterations", "1", "--rollout-batch-size", "4", "--max-new-tokens", "8",
                "--eval-every", "1000"],
    }[step]  # fmt: skip
    log = work / f"{step}-{size}.log"
    watch = FirstMetricsRow(out / "metrics.jsonl")
    result = common.run_measured(
        [common.INSTRUCT, *cmd, *common_flags], common.base_env(work), log, step, ready=STARTED
    )
    return {"command": step, "size": size, "first_step_s": watch.stop(), **result}


class FirstMetricsRow:
    """Seconds from now until a metrics file first holds a row (the end of step 1), watched from a thread."""

    def __init__(self, path: Path):
        self.path, self.started, self.seconds = path, time.time(), None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.done.is_set():
            if self.path.is_file() and self.path.read_text().strip():
                self.seconds = time.time() - self.started
                return
            time.sleep(0.2)

    def stop(self) -> float | None:
        self.done.set()
        self.thread.join()
        return self.seconds


HEADER = ["command", "size", "rows/s", "to training s", "to step 1 s", "after step 1 s", "wall s", "peak RSS MB"]


def table_rows(results: list[dict]) -> list[list]:
    """One table row per measured command."""
    rows = []
    for r in results:
        after = r["wall_s"] - r["first_step_s"] if r.get("first_step_s") is not None else None
        rate = r["rows"] / r["wall_s"] if r.get("rows") and r["wall_s"] else None
        rows.append([r["command"], r["size"], rate, r.get("ready_s"), r.get("first_step_s"), after, r["wall_s"],
                     r["peak_rss_mb"]])  # fmt: skip
    return rows


def growth_rows(results: list[dict], sizes: list[int]) -> list[list]:
    """Per command, last size over first size: wall time, time to step 1 and peak RSS."""
    rows = []
    for command in dict.fromkeys(r["command"] for r in results):
        first, last = (next((r for r in results if r["command"] == command and r["size"] == s), None) for s in
                       (sizes[0], sizes[-1]))  # fmt: skip
        if first is None or last is None or first is last:
            continue
        rows.append([command, f"{sizes[-1] / sizes[0]:g}x rows", common.ratio(last["wall_s"], first["wall_s"]),
                     common.ratio(last.get("first_step_s"), first.get("first_step_s")),
                     common.ratio(last["peak_rss_mb"], first["peak_rss_mb"])])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated row counts (SFT rows and prompts)")
    parser.add_argument("--model", default="smollm2-135m", help="model reference (default: the built-in model)")
    parser.add_argument("--steps", default="sft,rm,dpo,ppo", help="training commands to time (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="folder for the data and runs (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--smoke", action="store_true", help="the tiny test model at 200 and 1,000 rows (CI)")
    args = parser.parse_args()
    common.print_machine_header()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    model = args.model
    if args.smoke:
        sizes = [200, 1000]
        model = str(common.build_model(work / "model", hidden=64, layers=2, intermediate=128, heads=4))
    results: list[dict] = []
    try:
        for size in sizes:
            raw = raw_inputs(work, size, args.seed)
            data = {}
            for task, rows in (("sft", size), ("prefs", size // 2), ("prompts", size)):
                result, data[task] = prepare(work, raw[task], task, size, model, rows)
                results.append(result)
            for step in args.steps.split(","):
                results.append(train(work, step, data, size, model))
        common.print_table(f"Data at scale ({model})", HEADER, table_rows(results))
        if len(sizes) > 1:
            growth = ["command", "size", "wall", "to step 1", "peak RSS"]
            common.print_table(f"Growth from {sizes[0]:,} to {sizes[-1]:,} rows", growth, growth_rows(results, sizes))
        print(
            "rows/s: rows read per second of the whole prepare-data command; to training: launch to the line "
            "announcing the steps (loading, reading and encoding the data); to step 1: launch to the first metrics "
            "row; "
            "after step 1: the rest (rm: final eval and reward normalisation); peak RSS: the command's process."
        )
        failed = [f"{r['command']} at {r['size']}" for r in results if r["rc"] != 0]
        if failed:
            print("[bench] FAILED: " + ", ".join(failed), flush=True)
            raise SystemExit(1)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
