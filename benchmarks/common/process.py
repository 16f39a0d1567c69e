"""Running the things a benchmark times, each in its own process: the offline environment every side runs
in, set-up commands that must succeed, and the measured run -- a wrapper process around the command, so that
getrusage(RUSAGE_CHILDREN) in the wrapper is that command's alone (exit code, wall and CPU seconds, peak RSS,
and optionally its sampled peak PSS) -- with the machine gauge and load around it for bench_sft/bench_rm."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .machine import gauge, wait_for_quiet

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "PYTHONUNBUFFERED": "1",
}
"""Offline, no tokenizer threads, no tracker, unbuffered output: what every measured side runs with."""


def offline_env(threads: int = 0, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with OFFLINE, OMP/MKL_NUM_THREADS=`threads` when not 0, and `extra`."""
    env = {**os.environ, **OFFLINE}
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.update(extra or {})
    return env


def base_env(work: Path) -> dict[str, str]:
    """The environment both sides of bench_sft/bench_rm run in: offline, caches inside the work folder,
    nothing extra on the import path."""
    env = offline_env()
    env.update(
        {
            "HF_HOME": str(work / "hf-home"),
            "HF_DATASETS_CACHE": str(work / "hf-datasets"),
            "INSTRUCT_CACHE": str(work / "instruct-cache"),
        }
    )
    env.pop("PYTHONPATH", None)
    return env


def log_tail(log: Path, lines: int = 30) -> str:
    """The last lines of a log file."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def run_checked(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    """Run a set-up command (not measured); stop the benchmark with its log tail if it fails."""
    print(f"[bench] $ {' '.join(cmd)}", flush=True)
    with open(log, "w") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"[bench] failed (exit {done.returncode}); last lines of {log}:\n{log_tail(log)}")


# Runs the command as its only child, so RUSAGE_CHILDREN is that command's alone (the benchmark's own
# process runs several sides, and its RUSAGE_CHILDREN would be the largest of them all). With a sampling
# interval > 0 it also reads the child's /proc/PID/smaps_rollup that often for its peak PSS.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
out, every, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]

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
if every > 0:
    while process.poll() is None:
        for key, value in rollup(process.pid).items():
            peaks[key] = max(peaks.get(key, 0.0), value)
        time.sleep(every)  # reading smaps_rollup walks the page tables: not free on 2 cores
else:
    process.wait()
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
result = {"rc": process.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
          "cpu_s": usage.ru_utime + usage.ru_stime}
if every > 0:
    result.update(sampled_peak_pss_mb=peaks.get("Pss"), sampled_peak_anon_mb=peaks.get("Anonymous"))
with open(out, "w") as handle:
    json.dump(result, handle)
"""


def run_measured(
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    label: str,
    *,
    sample_every: float = 0.0,
    ready: re.Pattern | None = None,
) -> dict:
    """Run `cmd` under the wrapper, its output into `log`; returns rc, wall_s, cpu_s and peak_rss_mb of that
    command alone (with `sample_every` > 0 s, also its sampled peak PSS and anonymous memory, MB).

    With `ready`, the output passes through this process, each line stamped with its time since the launch,
    the command sees that launch time as $BENCH_LAUNCHED, and `ready_s` is the time of the first line that
    matches `ready` (None if none did).
    """
    result_file = log.with_suffix(".rusage.json")
    wrapped = [sys.executable, "-c", _WRAPPER, str(result_file), str(sample_every), *cmd]
    ready_s = None
    with open(log, "w") as handle:
        if ready is None:
            subprocess.run(wrapped, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
        else:
            launched = time.time()
            process = subprocess.Popen(
                wrapped,
                env={**env, "BENCH_LAUNCHED": repr(launched)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            for line in process.stdout:
                elapsed = time.time() - launched
                handle.write(f"[{elapsed:7.1f}s] {line}")
                handle.flush()
                if ready_s is None and ready.search(line):
                    ready_s = elapsed
            process.wait()
    result = json.loads(result_file.read_text())
    if ready is not None:
        result["ready_s"] = ready_s
    if result["rc"] != 0:
        print(
            f"[bench] {label} FAILED with exit code {result['rc']}; last lines of {log}:\n{log_tail(log)}", flush=True
        )
    return result


def measure(cmd: list[str], env: dict, log: Path, label: str, wait: float = 0) -> dict:
    """A side of bench_sft/bench_rm: `run_measured` after waiting (up to `wait` s) for the CPUs to go quiet;
    adds the machine gauge taken just before and the load average just after."""
    wait_for_quiet(wait)
    speed = gauge()
    print(f"[bench] {label}: $ {' '.join(cmd)}", flush=True)
    print(f"[bench] {label}: log in {log}", flush=True)
    result = run_measured(cmd, env, log, label)
    result["gauge_gflops"] = speed
    result["load"] = os.getloadavg()[0]  # runnable processes, 1-minute average: above 2 on 2 cores = contention
    return result
