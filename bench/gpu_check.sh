#!/usr/bin/env bash
# The CUDA path on a GPU host, from the repository root: `bash bench/gpu_check.sh [OUT_DIR]`.
# Needs a python3 with a CUDA build of torch (>= the version whose torch.nativert.backends
# the service uses) and g++; installs nothing else (the lowering needs only torch, numpy and
# sympy, which come with torch). Prints the environment, one JSON line per lowering, then
# a table; the rows also go to OUT_DIR/gpu_check.json when OUT_DIR is given.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${1:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, numpy, sympy" || { echo "gpu_check: $PY lacks torch/numpy/sympy" >&2; exit 2; }
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/gpu-check-inductor"
"$PY" bench/gpu_check.py ${out:+--json "$out/gpu_check.json"} "${@:2}"
