#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install diffusers-restore into it, with the extras given as
# arguments (e.g. `test`). Sourced by scripts/test.sh and scripts/demo.sh; safe to run again.
#
# torch: an existing torch in the environment is kept (GPU users: install your CUDA build first). Otherwise a
# machine with `nvidia-smi` gets the default torch, and a CPU-only machine gets torch==${TORCH_CPU_VERSION}, which is
# the CPU build available locally on the project's machines (override with TORCH_SPEC="torch==X.Y").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
extras=$(IFS=,; echo "$*")

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

if ! python -c "import torch" >/dev/null 2>&1; then
  if [[ -n "${TORCH_SPEC:-}" ]]; then
    python -m pip install -q "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==${TORCH_CPU_VERSION}"
  fi
fi
python -m pip install -q -e ".${extras:+[$extras]}"
