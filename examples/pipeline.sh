#!/usr/bin/env bash
# The InstructGPT flow step by step, the way you would script it yourself:
#   prepare-data -> sft -> rm -> ppo -> eval -> generate
#
#   bash examples/pipeline.sh                  # the built-in model, on CPU (about 12 minutes on 2 cores)
#   MODEL=path/to/model STEPS=5 bash examples/pipeline.sh   # another model; fewer steps for a quick try
#
# Variables: MODEL (default smollm2-135m), OUT (default ./pipeline-runs), QUANT (default none on CPU),
# STEPS (sft/rm optimizer steps, default 20), ITERATIONS (PPO iterations, default 20), INSTRUCT (the command).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="$HERE/data"
MODEL="${MODEL:-smollm2-135m}"
OUT="${OUT:-./pipeline-runs}"
QUANT="${QUANT:-none}"
STEPS="${STEPS:-20}"
ITERATIONS="${ITERATIONS:-20}"
INSTRUCT="${INSTRUCT:-instruct}"

# 1. data: canonical splits for each step (the tokenizer of MODEL measures token lengths)
$INSTRUCT prepare-data -i "$DATA/demonstrations.jsonl" --task sft --model "$MODEL" -o "$OUT/data/sft" --force
$INSTRUCT prepare-data -i "$DATA/preferences.jsonl" --task prefs --model "$MODEL" -o "$OUT/data/prefs" --force
$INSTRUCT prepare-data -i "$DATA/prompts.jsonl" --task prompts --model "$MODEL" --eval-fraction 0.25 \
  -o "$OUT/data/prompts" --force

# 2. supervised fine-tuning on the demonstrations
$INSTRUCT sft --model "$MODEL" --data "$OUT/data/sft" --out "$OUT/runs/sft" --quantization "$QUANT" \
  --max-steps "$STEPS" --batch-size 8 --lr 5e-4 --lora-dropout 0 --no-gradient-checkpointing --force

# 3. reward model, initialised from the SFT run, on the preference pairs
$INSTRUCT rm --model "$OUT/runs/sft" --data "$OUT/data/prefs" --out "$OUT/runs/rm" --quantization "$QUANT" \
  --max-steps "$STEPS" --batch-size 8 --lr 5e-4 --lora-dropout 0 --no-gradient-checkpointing --force

# 4. PPO against the reward model, KL-anchored to the SFT model
$INSTRUCT ppo --sft "$OUT/runs/sft" --reward "$OUT/runs/rm" --data "$OUT/data/prompts" --out "$OUT/runs/ppo" \
  --quantization "$QUANT" --iterations "$ITERATIONS" --rollout-batch-size 8 --minibatch-size 4 --ppo-epochs 2 \
  --lr 2e-4 --max-new-tokens 48 --no-gradient-checkpointing --force

# 5. did it help? reward, win-rate against SFT, KL, with plots
$INSTRUCT eval --models "$OUT/runs/sft,$OUT/runs/ppo" --reward "$OUT/runs/rm" --data "$OUT/data/prompts" \
  --quantization "$QUANT" --max-new-tokens 48 --out "$OUT/reports/pipeline" --force

# 6. talk to the result
$INSTRUCT generate --model "$OUT/runs/ppo" --quantization "$QUANT" --max-new-tokens 48 "What is the capital of Italy?"
