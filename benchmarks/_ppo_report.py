"""bench_ppo's report: the memory and speed table of each quantization with its shared / separate ratios,
the CLI variants' per-phase table, and the warning-like lines of the measured logs."""

from __future__ import annotations

import re
from pathlib import Path

from _ppo_sides import PHASES
from common import fmt, print_table, ratio


def report(quantization: str, model: str, baseline: dict, sides: dict[str, dict], args) -> dict:
    """The table of one quantization (on `model`) and its ratios; returns {side: {"raw": .., "net": .., "pss": ..}}."""
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
        f"PPO memory and speed, quantization {quantization} (model {model}, rollouts of "
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
