#!/usr/bin/env bash
# The prepared GPU check: one CUDA device, ≤ 8 minutes, one JSON (default gpu_check.json). See gpu_check.py.
# Usage: bash benchmarks/gpu_check.sh [--out FILE] [--skip train eval e2e]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
[ -x "$PY" ] || PY=python
exec "$PY" benchmarks/gpu_check.py "$@"
