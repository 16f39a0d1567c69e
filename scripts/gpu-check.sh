#!/usr/bin/env bash
# On a CUDA machine: run the quickstart flow on the built-in model with the GPU defaults (nf4 + bf16, or fp16
# with loss scaling), then print per step the measured peak GPU memory next to `instruct plan`'s estimate,
# PPO's first-minibatch approxkl (0 when rollout and update agree on precision) and the throughput.
# Needs nothing from the network; about 5 minutes on one GPU. Usage: bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
INSTRUCT=.venv/bin/instruct
nvidia-smi -L
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, \
torch.cuda.get_device_name(0), 'bf16' if torch.cuda.is_bf16_supported() else 'no bf16 (fp16 + loss scaling)')"
RECIPE=recipes/gpu/gpu-check.yaml
rm -rf gpu-runs
start=$(date +%s)
$INSTRUCT run "$RECIPE"
echo "gpu-check: the whole flow took $(( $(date +%s) - start )) s"
$INSTRUCT plan "$RECIPE" --json > gpu-runs/plan.json
$PY - <<'PY'
import json
from pathlib import Path

plan = {s["step"]: s for s in json.loads(Path("gpu-runs/plan.json").read_text())["steps"]}
gib = 2**30
print(f"{'step':6} {'peak GiB':>9} {'plan GiB':>9} {'ratio':>6}  throughput, first-minibatch approxkl")
for step in ("sft", "rm", "ppo"):
    folder = Path("gpu-runs/runs") / step
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    peak = manifest.get("peak_memory_gib")
    estimate = plan[step]["total"] / gib
    extra = (f"{rows[-1].get('train/tokens_per_s', 0):.0f} tokens/s" if step != "ppo" else
             f"{rows[-1]['train/samples_per_s']:.2f} rollouts/s, first approxkl {rows[0]['policy/first_approxkl']:.2e}, "
             f"clipfrac {rows[0]['policy/first_clipfrac']:.3f}, precision {manifest['config'].get('precision')}")
    ratio = f"{peak / estimate:.2f}" if peak and estimate else "-"
    print(f"{step:6} {peak or 0:9.2f} {estimate:9.2f} {ratio:>6}  {extra}")
PY
