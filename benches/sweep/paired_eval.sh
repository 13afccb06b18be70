#!/usr/bin/env bash
# Paired before/after check of a DDPO run: the same prompts and the same sampler noise through
# the shipped model and through the run's finetuned checkpoint, with the sampler settings
# `ddpo train` uses (10 steps, no x0 clamp). Prints each model's `ddpo eval` JSON and writes
# their sample grids next to the run.
#
#   bash benches/sweep/paired_eval.sh RUN_DIR [PROMPT_SCRIPT] [PER_PROMPT] [SEED]
#
# PROMPT_SCRIPT (default scripts/prompts.rhai) is read for its quoted captions (comment lines skipped); PER_PROMPT
# samples each (default 4); SEED is the sampler noise seed (default 0). Not part of CI.
set -euo pipefail
run=${1:?usage: paired_eval.sh RUN_DIR [PROMPT_SCRIPT] [PER_PROMPT] [SEED]}
script=${2:-scripts/prompts.rhai}
per_prompt=${3:-4}
seed=${4:-0}
bin=target/release/ddpo
args=()
while IFS= read -r caption; do args+=(--prompt "$caption"); done < <(grep -v '^[[:space:]]*//' "$script" | grep -o '"[^"]*"' | tr -d '"')
for side in before after; do
  model=models/shapes-unet.safetensors
  [ "$side" = after ] && model=$run/checkpoint/policy.safetensors
  echo "== $side: $model"
  "$bin" eval --model "$model" --steps 10 --clip-sample false --seed "$seed" --per-prompt "$per_prompt" \
    --grid "$run/eval-$side.png" "${args[@]}" > "$run/eval-$side.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: v for k, v in d.items() if k != 'per_prompt'})" "$run/eval-$side.json"
done
