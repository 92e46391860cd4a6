#!/usr/bin/env bash
# Set up (once) and run MERGE end to end on the offline MiniLM demo (≈ 34 min on 2 CPU cores the
# first time: zoo build, search, baselines, export, predict, evaluate). Quick toy version:
# `python examples/tiny_demo.py` (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/minilm_demo.py "$@"
