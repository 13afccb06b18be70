#!/usr/bin/env bash
# The GPU check: `ddpo selftest` on CUDA in f32 and f16, a tiny-SD DDPO epoch on CUDA, then a DDPO
# epoch of a Stable-Diffusion-1.5-sized model (SD 1.5's configs, seeded random weights) at the
# reference's settings beside its PyTorch twin (ddpo_torch.py), with the time and peak GPU memory
# of each stage. It needs only a `ddpo` binary built with `--features cuda` and the repository's
# tests/fixtures and benches/gpu (what a lent GPU machine gets carried to it); the twin needs
# torch, transformers and peft, and diffusers, which may come as wheels in benches/gpu/wheels.
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

# stage NAME CMD...: runs CMD, prints its wall time (and on a GPU the peak memory nvidia-smi saw
# while it ran); the first failing stage stops the script
stage() {
    local name="$1"; shift
    local start end poller=""
    if [ "$dry_run" = 0 ] && command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$work/$name.mem" 2> /dev/null &
        poller=$!
    fi
    start=$(date +%s.%N)
    if ! "$@" > "$work/$name.log" 2>&1; then
        echo "stage $name FAILED; its output:" >&2
        tail -n 40 "$work/$name.log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    [ -n "$poller" ] && kill "$poller" 2> /dev/null && wait "$poller" 2> /dev/null
    grep -E '^(pass|FAIL)' "$work/$name.log" || true
    awk -v n="$name" -v s="$start" -v e="$end" 'BEGIN { printf "stage %-22s %8.2f s", n, e - s }'
    [ -s "$work/$name.mem" ] && sort -n "$work/$name.mem" | tail -n 1 | awk '{ printf "   peak GPU memory %6d MiB", $1 }'
    echo
}

# epoch_seconds RUN: sampling and training seconds of a run's first epoch
epoch_seconds() {
    python3 -c 'import json, sys; m = json.loads(open(sys.argv[1]).readline()); print("  ddpo: sampling %.2f s, training %.2f s" % (m["seconds_sampling"] + m["seconds_reward"], m["seconds_training"]))' "$1/metrics.jsonl"
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

# A DDPO epoch of an SD-1.5-sized model at the reference's settings (512x512, 50 DDIM steps, eta 1,
# guidance 5, LoRA rank 4, sample batch 8, train batch 1, frozen weights in f16): SD 1.5's configs
# with seeded random weights, then the PyTorch twin on the same folder and weights. The dry run
# does the same on tiny-sd's configs, with 2 samples of 2 steps, in f32.
sd="$work/sd"
if [ "$dry_run" = 1 ]; then
    cp -r "$fixtures/tiny-sd" "$sd" && find "$sd" -name '*.safetensors' -delete
    sd_epoch=(--samples-per-epoch 2 --sample-batch-size 2 --train-batch-size 1 --steps 2 --dtype f32)
    twin=(--samples 2 --sample-batch-size 2 --train-batch-size 1 --steps 2 --device cpu)
else
    cp -r benches/gpu/sd15 "$sd" && cp -r "$fixtures/tiny-sd/tokenizer" "$sd/"
    sd_epoch=(--samples-per-epoch 8 --sample-batch-size 8 --train-batch-size 1 --steps 50 --dtype f16)
    twin=(--samples 8 --sample-batch-size 8 --train-batch-size 1 --steps 50 --device cuda)
fi
stage sd-random-weights "$bin" bench --random-weights "$sd"
# No KL term (train's default adds one): the reference and its twin have none.
stage sd15-epoch "$bin" train --model-dir "$sd" --device "$device" --run-dir "$work/sd-run" --lora-rank 4 \
    --epochs 1 --reward brightness --prompt "a photo of a cat" --kl-weight 0 "${sd_epoch[@]}"
epoch_seconds "$work/sd-run"
# The twin: diffusers may travel as a wheel (pip download --no-deps diffusers -d benches/gpu/wheels).
if compgen -G "benches/gpu/wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps --target "$work/py" benches/gpu/wheels/*.whl > /dev/null 2>&1 &&
        export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
fi
if python3 -c "import torch, diffusers, transformers, peft" 2> /dev/null; then
    stage sd15-torch-twin python3 benches/gpu/ddpo_torch.py --model-dir "$sd" "${twin[@]}"
    tail -n 1 "$work/sd15-torch-twin.log" | sed 's/^/  torch: /'
else
    echo "stage sd15-torch-twin      skipped: python3 lacks torch, diffusers, transformers or peft"
fi
echo "check.sh: all stages passed"
