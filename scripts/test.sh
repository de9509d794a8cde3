#!/usr/bin/env bash
# Install diffusers-restore with its test extra into .venv and run the whole test suite offline.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh test
export HF_HUB_OFFLINE=1
python -m pytest tests examples -q -rs "$@"
