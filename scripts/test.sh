#!/usr/bin/env bash
# Set up (once) and run the whole test suite. pytest's exit code 5 (no tests ran) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
rc=$?
[ $rc -eq 5 ] && { echo "no tests ran: failing" >&2; exit 1; }
exit $rc
