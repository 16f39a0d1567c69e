"""Every benchmark runs in CI: each script's --smoke mode runs the same code path on a tiny model and exits
non-zero when a side fails, so a refactor that breaks a benchmark fails here (a README figure never rests
on a script that no longer runs). bench_sft and bench_rm install TRL for themselves on first use, or skip
its side with a message when the package registry cannot be reached."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script", ["bench_sft.py", "bench_rm.py", "bench_plan.py", "bench_ppo.py", "bench_generate.py", "bench_data.py"]
)
def test_benchmark_smoke_run(script):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "FAILED" not in output, output[-4000:]
    if script in ("bench_sft.py", "bench_rm.py") and "SKIPPED the TRL side" not in output:
        assert "instruct / TRL" in output  # both sides measured, side by side
    if script == "bench_generate.py":  # every path and the real command measured, side by side
        for row in ("nf4 ", "fp32 ", "bf16 ", "merged (", "unmerged (", "base model ", "run "):
            assert f"\n{row}" in output, row
