#!/usr/bin/env bash
# The GPU check: `ddpo selftest` on CUDA in f32 and f16, then a tiny-SD DDPO epoch on CUDA, with
# the time of each stage. It needs only a `ddpo` binary built with `--features cuda` and the
# repository's tests/fixtures and models/ (what a lent GPU machine gets carried to it).
#   bash benches/gpu/check.sh [--dry-run]
# --dry-run (or DDPO_GPU_DRY_RUN=1): the same stages on the CPU with tiny sizes, for CI.
# Env: DDPO_BIN (default: ddpo on PATH, else target/release/ddpo; a .gz is unpacked first),
# DDPO_FIXTURES (tests/fixtures).
set -euo pipefail
cd "$(dirname "$0")/../.."

device=cuda
dry_run="${DDPO_GPU_DRY_RUN:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        *) echo "check.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
    esac
done
[ "$dry_run" = 1 ] && device=cpu

bin="${DDPO_BIN:-$(command -v ddpo || echo target/release/ddpo)}"
fixtures="${DDPO_FIXTURES:-tests/fixtures}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The stripped CUDA binary is ~71 MiB, over a lent machine's 64 MiB carry: it travels gzipped.
if [[ "$bin" == *.gz ]]; then
    gunzip -c "$bin" > "$work/ddpo" && chmod +x "$work/ddpo" && bin="$work/ddpo"
fi
[ -x "$bin" ] || { echo "check.sh: no ddpo binary at $bin; set DDPO_BIN=PATH" >&2; exit 2; }
# A CUDA 13 build needs cuBLAS 13, cuRAND and NVRTC at run time; where the system has none (a lent
# machine keeps them in PyTorch's venv as nvidia-* wheels), use the wheels' folders.
if ldd "$bin" 2>/dev/null | grep -q "not found"; then
    wheel_libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, nvidia
roots = list(nvidia.__path__)
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(r + "/**/lib*.so*", recursive=True)})))
PY
)
    [ -n "$wheel_libs" ] && export LD_LIBRARY_PATH="$wheel_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ldd "$bin" | grep "not found" >&2 && echo "check.sh: $bin misses the libraries above" >&2 && exit 2
fi

# stage NAME CMD...: runs CMD, prints its wall time; the first failing stage stops the script
stage() {
    local name="$1"; shift
    local start end
    start=$(date +%s.%N)
    if ! "$@" > "$work/$name.log" 2>&1; then
        echo "stage $name FAILED; its output:" >&2
        tail -n 40 "$work/$name.log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    grep -E '^(pass|FAIL)' "$work/$name.log" || true
    awk -v n="$name" -v s="$start" -v e="$end" 'BEGIN { printf "stage %-22s %8.2f s\n", n, e - s }'
}

echo "check.sh: $bin on $device (dry run: $dry_run)"
stage selftest-f32 "$bin" selftest --device "$device" --dtype f32 --fixtures "$fixtures"
stage selftest-f16 "$bin" selftest --device "$device" --dtype f16 --fixtures "$fixtures"

# a DDPO epoch on the tiny SD pipeline; the dry run shrinks it to one 2-step batch
if [ "$dry_run" = 1 ]; then
    epoch=(--samples-per-epoch 2 --sample-batch-size 2 --train-batch-size 2 --steps 2)
else
    epoch=(--samples-per-epoch 16 --sample-batch-size 8 --train-batch-size 4 --steps 20)
fi
stage tiny-sd-epoch "$bin" train --model-dir "$fixtures/tiny-sd" --device "$device" \
    --run-dir "$work/run" --lora-rank 4 --epochs 1 "${epoch[@]}" --prompt "a photo of a cat"
[ -s "$work/run/metrics.jsonl" ] || { echo "check.sh: the epoch wrote no metrics.jsonl" >&2; exit 1; }
echo "check.sh: all stages passed"
