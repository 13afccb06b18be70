#!/usr/bin/env bash
# The trainer's hyper-parameter sweep (issue 3): each configuration trains the shipped default for
# at most BUDGET seconds of wall time (SIGINT ends it gracefully at the next epoch boundary, with
# a checkpoint), then report.py tabulates the JPEG-size change per configuration.
#
#   bash benches/sweep/sweep.sh [compressibility|incompressibility] [BUDGET_SECONDS]
#
# Runs go to runs/sweep-<reward>/<name>/. Not part of CI: a full sweep takes hours on 2 cores.
set -euo pipefail
reward=${1:-compressibility}
budget=${2:-1800}
out=runs/sweep-$reward
bin=target/release/ddpo
cargo build --release --quiet
mkdir -p "$out"

# name | flags (on top of `ddpo train --reward $reward --epochs 1000`)
configs=(
  "ref-lr3e-4-clip1e-4|--lr 3e-4 --clip-range 1e-4"
  "lr1e-3|--lr 1e-3 --clip-range 1e-4"
  "lr3e-3|--lr 3e-3 --clip-range 1e-4"
  "lr1e-3-clip1e-3|--lr 1e-3 --clip-range 1e-3"
  "lr1e-3-inner2|--lr 1e-3 --clip-range 1e-4 --inner-epochs 2"
  "lr1e-3-s64|--lr 1e-3 --clip-range 1e-4 --samples-per-epoch 64"
  "lora8-lr3e-3|--lr 3e-3 --clip-range 1e-4 --lora-rank 8"
  "sf-lr1e-3|--algo sf --lr 1e-3"
)
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
