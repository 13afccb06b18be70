#!/usr/bin/env bash
# The trainer's hyper-parameter sweep (issue 3): each configuration trains the shipped default for
# at most BUDGET seconds of wall time (SIGINT ends it gracefully at the next epoch boundary, with
# a checkpoint), then report.py tabulates the JPEG-size change per configuration.
#
#   bash benches/sweep/sweep.sh [compressibility|incompressibility] [BUDGET_SECONDS] [NAME ...]
#
# Runs go to runs/sweep-<reward>/<name>/. Not part of CI: a full sweep takes hours on 2 cores.
set -euo pipefail
reward=${1:-compressibility}
budget=${2:-300}
out=runs/sweep-$reward
bin=target/release/ddpo
cargo build --release --quiet
mkdir -p "$out"

# name | flags on top of `ddpo train --reward $reward --epochs 1000` with today's defaults
# (benches/sweep/RESULTS.md has every run's full settings, including the earlier stages' grid
# on the old defaults).
configs=(
  "default|"
  "lr3e-4|--lr 3e-4"
  "lr3e-5|--lr 3e-5"
  "all-steps|--min-train-sigma 0"
  "clamp|--clip-sample true"
  "steps20|--steps 20"
  "sf|--algo sf"
  "rwr|--algo rwr"
  "ref-clip1e-4|--clip-range 1e-4"
  "s64-inner2|--samples-per-epoch 64 --inner-epochs 2"
  "lora8-lr1e-3|--lora-rank 8 --lr 1e-3"
  "min-count16|--stat-min-count 16"
  "range-penalty1|--range-penalty 1"
  "lr1e-4|--lr 1e-4"
  "inner2|--inner-epochs 2"
)
# Names given after the budget select a subset: sweep.sh compressibility 300 sf-lr3e-4 ...
if [ $# -gt 2 ]; then
  keep=("${@:3}")
  selected=()
  for entry in "${configs[@]}"; do
    for k in "${keep[@]}"; do [ "${entry%%|*}" = "$k" ] && selected+=("$entry"); done
  done
  configs=("${selected[@]}")
fi
for entry in "${configs[@]}"; do
  name=${entry%%|*}
  flags=${entry#*|}
  dir=$out/$name
  [ -f "$dir/metrics.jsonl" ] && { echo "skip $name (done)"; continue; }
  echo "== $name: $flags"
  # shellcheck disable=SC2086
  timeout -s INT -k 300 "$budget" "$bin" train --reward "$reward" --epochs 1000 --run-dir "$dir" $flags || true
done
python3 benches/sweep/report.py "$out"/*/
