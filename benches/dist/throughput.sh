#!/usr/bin/env bash
# Data-parallel throughput on one machine: 2 MPI ranks of 1 thread each against 1 process of
# 2 threads, the same run (default model, compressibility, 32 samples per epoch, 10 steps),
# interleaved ROUNDS times so machine drift hits both alike. Prints seconds per epoch (the
# epoch's sampling + reward + training seconds from metrics.jsonl, epochs after the first).
# Needs a `--features mpi` build: DDPO_BIN (default target/release/ddpo), mpirun.
set -euo pipefail
bin="${DDPO_BIN:-target/release/ddpo}"
rounds="${ROUNDS:-3}"
epochs="${EPOCHS:-4}"
out="$(mktemp -d)"
args=(train --reward compressibility --samples-per-epoch 32 --sample-batch-size 8 --train-batch-size 8 --epochs "$epochs")
per_epoch() {  # mean seconds per epoch after the first, from a run folder
    python3 -c "
import json,sys
m=[json.loads(l) for l in open(sys.argv[1]+'/metrics.jsonl')][1:]
print(sum(r['seconds_sampling']+r['seconds_reward']+r['seconds_training'] for r in m)/len(m))" "$1"
}
for i in $(seq "$rounds"); do
    RAYON_NUM_THREADS=2 "$bin" "${args[@]}" --run-dir "$out/one-$i" >/dev/null 2>&1
    RAYON_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np 2 "$bin" "${args[@]}" --run-dir "$out/two-$i" >/dev/null 2>&1
    one=$(per_epoch "$out/one-$i"); two=$(per_epoch "$out/two-$i")
    python3 -c "print(f'round $i: 1 rank x 2 threads {$one:.2f} s/epoch, 2 ranks x 1 thread {$two:.2f} s/epoch, ratio {$one/$two:.2f}')"
done
rm -rf "$out"
