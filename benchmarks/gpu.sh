#!/usr/bin/env bash
# GPU benchmark, one command on a machine with an NVIDIA GPU, the repo and its .venv:
#   bash benchmarks/gpu.sh            (about 6-8 minutes; results: benchmarks/results/gpu-<device>.json/.md)
# Train-step throughput of EfficientNet B0/B3/B6 (random weights, no download) at 224/448 px in
# float32, mixed_float16 and mixed_float16+XLA, and the real input pipeline's time per batch next
# to the step time. The Python part (benchmarks/gpu.py) stops starting new models after its
# budget; `timeout` is the hard limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu.sh: nvidia-smi not found: this script needs an NVIDIA GPU (for a CPU dry run: $PY -m benchmarks.gpu --smoke)" >&2
  exit 2
fi
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | sed 's/^ *//; s/ *$//')
SLUG=$(printf '%s' "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
echo "gpu.sh: $DEVICE -> benchmarks/results/gpu-$SLUG.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
exec timeout --signal=INT --kill-after=20 "${GPU_BENCH_TIMEOUT:-470}" \
  "$PY" -m benchmarks.gpu --device "$DEVICE" --out "gpu-$SLUG" --budget-s "${GPU_BENCH_BUDGET:-400}"
