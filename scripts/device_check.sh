#!/usr/bin/env bash
# The prepared GPU check: one command, everything into OUTDIR.
#
#   scripts/device_check.sh OUTDIR [--sizes tiny] [--compile-backend aot_eager] [--device cuda:1]
#
# Runs `flux2-accel bench --preset device-check --out OUTDIR` (optim/bench/device_check.py): FLUX.2 [dev] at
# 1024x1024, 28 steps (baseline, pack-bf16, fp8-fast, fbcache-half, all-on, compile, nf4-offload, teacache,
# attn-cudnn/flash/sage) and FLUX.2 [klein] 4B at 1024x1024, 4 steps (baseline, pack-bf16, compile), on random bf16
# weights built on the GPU. Needs one NVIDIA GPU with 80 GB or more ([dev]'s bf16 weights alone are 64 GB).
#
# Writes into OUTDIR: device_check.json (every row: s/step, s/image, peak VRAM, skipped steps, deviation),
# device_check.md (the README table, also printed at the end), dev.png and klein-4b.png (speedup against
# deviation), device_check.log (progress, warnings, failed rows' tracebacks), console.log (everything printed),
# nvidia-smi.txt (where nvidia-smi exists). Exit status: 0 all rows ran or were unavailable, 1 a row failed
# (recorded in the JSON and the table), 124 the hard time limit below cut the run (the JSON still holds every row
# finished by then).
#
# Time budget on one H200 (estimates; the arithmetic is in optim/bench/device_check.py):
#   start + CUDA init ~20 s
#   [dev]: one 28-step bf16 image = 28 x 2.83e14 FLOP / (~50% of 990 TFLOP/s) ~ 16 s; each row = build 64 GB of
#          random weights on the GPU (~8 s) + a 2-step warm-up (~1.2 s) + one timed image:
#          baseline 25 + pack-bf16 25 + fp8-fast 22 + fbcache-half 17 + all-on 70 (compile ~60) + compile 65
#          + nf4-offload 40 + teacache 25 + attn-cudnn 25 (+25 each for flash / sage where installed) ~ 315 s
#   [klein] 4B: 4 steps ~ 0.3 s an image: baseline 10 + pack-bf16 10 + compile 45 ~ 65 s
#   total ~ 400 s (under 7 min). Guard rails: [dev] rows start only in the first 300 s, [klein] rows in the first
#   400 s (later ones are reported "not run"), and the hard limit below stops the run at 470 s (7 min 50 s).
set -u -o pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUTDIR [--sizes tiny] [--compile-backend NAME] [--device DEVICE]" >&2
    exit 2
fi
OUT="$1"
shift
mkdir -p "$OUT"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
LIMIT_S="${FLUX2_ACCEL_DEVICE_CHECK_LIMIT_S:-470}"

# This checkout as `flux2_accel` (a symlink first on PYTHONPATH), whatever copy of the pack is installed.
LINK_DIR="$(mktemp -d)"
trap 'rm -rf "$LINK_DIR"' EXIT
ln -s "$(dirname "$HERE")" "$LINK_DIR/flux2_accel"
export PYTHONPATH="$LINK_DIR${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "flux2-accel device check: $(date -u +%Y-%m-%dT%H:%M:%SZ), limit ${LIMIT_S} s, output in $OUT"
    timeout --signal=INT --kill-after=20 "$LIMIT_S" \
        "$PYTHON" -m flux2_accel.optim.cli bench --preset device-check --out "$OUT" "$@"
    status=$?
    echo "flux2-accel device check: exit status $status"
    exit $status
} 2>&1 | tee "$OUT/console.log"
