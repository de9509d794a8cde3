#!/usr/bin/env bash
# Install diffusers-restore with its demo extra into .venv and run the demo: a photo the bundled restorer never trained
# on (coffee, from its validation split: it was used to choose the recipe, so it is not a held-out photo) is degraded,
# restored, and written as degraded | restored | clean. Usage: bash scripts/demo.sh [sana-restore demo arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh demo
export HF_HUB_OFFLINE=1
sana-restore demo -o demo.png "$@"
