#!/usr/bin/env bash
# Prepares what a lent GPU machine needs for benches/gpu/check.sh, all in ignored folders: the
# CUDA build (.ci/cuda-build), stripped and gzipped to fit a call's 64 MiB carry, and diffusers
# as a wheel for the PyTorch twin. Prints the command and the paths to carry.
#   bash benches/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benches/gpu/carry
mkdir -p "$out" benches/gpu/wheels
bash .ci/cuda-build
strip -o "$out/ddpo-cuda" target/cuda/release/ddpo
gzip -9 -f "$out/ddpo-cuda"
compgen -G "benches/gpu/wheels/diffusers-*.whl" > /dev/null ||
    python3 -m pip download --quiet --no-deps diffusers -d benches/gpu/wheels
du -sh "$out/ddpo-cuda.gz" benches/gpu/wheels
echo "on the GPU machine, carrying $out and benches/gpu/wheels:"
echo "  DDPO_BIN=$out/ddpo-cuda.gz bash benches/gpu/check.sh"
