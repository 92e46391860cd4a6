#!/usr/bin/env bash
# Set up (once) and run mergetool end to end on the offline demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/tiny_demo.py
