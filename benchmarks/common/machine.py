"""Facts about the machine a benchmark runs on, and how busy it is: the header every benchmark prints first
(CPU model, ISA, cores, fp32 matmul GFLOP/s, git commit), the matmul gauge, waiting for the CPUs to go quiet,
pre-touching memory, and this process's resident memory."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .paths import ROOT


def lscpu() -> dict[str, str]:
    """`lscpu`'s "Key: value" lines ({} when lscpu is not there)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    return {
        key.strip(): value.strip() for key, sep, value in (line.partition(":") for line in text.splitlines()) if sep
    }


def cpu_flags(facts: dict[str, str]) -> set[str]:
    """The CPU's feature flags: lscpu's "Flags", else the first "flags" line of /proc/cpuinfo."""
    if facts.get("Flags"):
        return set(facts["Flags"].split())
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def isa(flags: set[str]) -> str:
    """The widest x86 vector extension the matmuls can use: avx512f, avx2, or "no avx2"."""
    for name in ("avx512f", "avx2"):
        if name in flags:
            return name
    return "no avx2"


def git_commit() -> str:
    """The repository's commit (short hash), marked when tracked files have uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def gauge() -> float:
    """GFLOP/s of a small fp32 matmul right now (best of 5): how fast this machine is at the moment.

    Virtual machines on a shared host can run several times slower for a while; a run whose gauge is far
    below the others' was measured in such a spell.
    """
    import numpy as np

    a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        best = min(best, time.perf_counter() - start)
    return 10 * 2 * 512**3 / best / 1e9


def machine() -> dict:
    """CPU model (lscpu "Model name"), ISA, cores, fp32 matmul GFLOP/s (`gauge`) and git commit."""
    facts = lscpu()
    return {
        "cpu": facts.get("Model name") or "unknown CPU",
        "isa": isa(cpu_flags(facts)),
        "cores": os.cpu_count() or 1,
        "gflops": gauge(),
        "commit": git_commit(),
    }


def print_machine_header() -> dict:
    """Print the line that names the machine and the code a benchmark's numbers come from (the facts
    benchmarks/RESULTS.md keeps with every figure); returns them."""
    facts = machine()
    print(
        f"[bench] machine: {facts['cpu']}, {facts['isa']}, {facts['cores']} cores, fp32 matmul "
        f"{facts['gflops']:.1f} GFLOP/s; commit {facts['commit']}",
        flush=True,
    )
    return facts


def busy_cpus(seconds: float = 3.0) -> float:
    """How many CPUs were busy (not idle) over the next `seconds`, from /proc/stat."""

    def sample():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> None:
    """Wait (up to `max_wait` seconds) until other work leaves the CPUs alone: fewer than `threshold` CPUs busy."""
    if max_wait <= 0:
        return
    start = time.perf_counter()
    while (busy := busy_cpus()) >= threshold:
        if time.perf_counter() - start > max_wait:
            print(
                f"[bench] still {busy:.1f} CPUs busy with other work after {max_wait:.0f} s; timing anyway", flush=True
            )
            return
    waited = time.perf_counter() - start
    if waited > 4:
        print(f"[bench] waited {waited:.0f} s for other work to leave the CPUs", flush=True)


def prewarm_memory(gib: float) -> None:
    """Touch `gib` GiB of memory once, all held at the same time, then free it.

    On a freshly started virtual machine whose memory the host backs lazily, the first touch of each page
    is slow (seconds per GiB), so whichever side runs first, or allocates more, would be charged for it.
    Touching the memory up front makes the sides' timings comparable; on a warm machine it takes a second.
    """
    if gib <= 0:
        return
    import numpy as np

    try:
        available = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        gib = min(gib, available / 2**20 - 3)
    except (OSError, StopIteration):
        pass
    start, chunks = time.perf_counter(), []
    for _ in range(int(gib)):
        chunks.append(np.ones(2**30, dtype=np.uint8))
    del chunks
    print(
        f"[bench] pre-touched {int(gib)} GiB of memory in {time.perf_counter() - start:.1f} s "
        "(slow only the first time on a fresh virtual machine)",
        flush=True,
    )


def memory_status() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, in MB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, amount = line.split(":")
            values[key] = int(amount.split()[0]) / 1024
    return values
