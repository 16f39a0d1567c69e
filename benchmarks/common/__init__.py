"""What the benchmarks share, in one place; each script imports it as `common` (its own folder is first on
sys.path when it runs).

benchmarks/ holds one script per benchmark (bench_*.py: its flags, its sides, its report), the private
helpers of a single script (_ppo_*.py, _plan_*.py), and this package:

    paths       the repository, the interpreter and the `instruct` command the sides run
    machine     the machine: the header every script prints first (CPU model, ISA, cores, fp32 matmul
                GFLOP/s, git commit), the matmul gauge, waiting for quiet CPUs, pre-touching memory, VmRSS/VmHWM
    process     the offline environment, set-up commands, and a measured run in its own process (exit code,
                wall/CPU seconds, peak RSS, sampled peak PSS)
    timing      step timers and batch counters, the steps a run is timed over, a side's numbers
    data        synthetic rows (short or real-shaped), JSONL, `instruct prepare-data`
    model       the random Llama built at run time
    trl_side    TRL installed for the benchmark alone, its worker process and training loop
    trainers    the body bench_sft and bench_rm share: flags, --smoke, instruct's side, the run loop
    tables      fixed-width and markdown tables, number formatting, instruct / TRL ratios

Nothing here is part of the `instruct_cli` package.
"""

from .data import (
    LONG_SHAPE,
    REAL_SHAPE,
    long_preference_rows,
    long_sft_rows,
    preference_rows,
    prepare_data,
    read_jsonl,
    real_preference_rows,
    real_sft_rows,
    sft_rows,
    tokens_per_word,
    write_jsonl,
)
from .machine import (
    busy_cpus,
    gauge,
    git_commit,
    machine,
    memory_status,
    prewarm_memory,
    print_machine_header,
    wait_for_quiet,
)
from .model import build_model, default_model
from .paths import BENCH_DIR, INSTRUCT, PYTHON, ROOT
from .process import OFFLINE, base_env, log_tail, measure, offline_env, run_checked, run_measured
from .tables import fmt, print_markdown, print_table, ratio, ratio_row
from .timing import (
    CountingCollator,
    best_run,
    instruct_step_ends,
    median_step,
    steady,
    step_batches,
    step_timer_callback,
    summarise,
)
from .trainers import SMOKE_SHAPE, add_model_flags, apply_smoke, failure, run_benchmark, run_instruct
from .trl_side import TRL_DIR, TRL_VERSION, ensure_trl, run_trl, train_and_record, trl_env, trl_model_kwargs

__all__ = [
    "BENCH_DIR",
    "INSTRUCT",
    "OFFLINE",
    "PYTHON",
    "LONG_SHAPE",
    "REAL_SHAPE",
    "ROOT",
    "SMOKE_SHAPE",
    "TRL_DIR",
    "TRL_VERSION",
    "CountingCollator",
    "add_model_flags",
    "apply_smoke",
    "base_env",
    "best_run",
    "build_model",
    "busy_cpus",
    "default_model",
    "ensure_trl",
    "failure",
    "fmt",
    "gauge",
    "git_commit",
    "instruct_step_ends",
    "log_tail",
    "machine",
    "measure",
    "median_step",
    "memory_status",
    "offline_env",
    "long_preference_rows",
    "long_sft_rows",
    "preference_rows",
    "prepare_data",
    "prewarm_memory",
    "print_machine_header",
    "print_markdown",
    "print_table",
    "ratio",
    "ratio_row",
    "read_jsonl",
    "real_preference_rows",
    "real_sft_rows",
    "run_benchmark",
    "run_checked",
    "run_instruct",
    "run_measured",
    "run_trl",
    "sft_rows",
    "steady",
    "step_batches",
    "step_timer_callback",
    "summarise",
    "tokens_per_word",
    "train_and_record",
    "trl_env",
    "trl_model_kwargs",
    "wait_for_quiet",
    "write_jsonl",
]
