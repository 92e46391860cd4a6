#!/usr/bin/env bash
# Set up (once) and run the whole test suite. pytest's exit code 5 (no tests ran) is a failure.
#   bash scripts/test.sh            on the locked set, in .venv (what the README and CI run)
#   bash scripts/test.sh --latest   on the newest releases pyproject allows, in .venv-latest: the drift
#                                   check, run on purpose. torch stays the CPU wheel.
#   bash scripts/test.sh --oldest   on the oldest releases pyproject allows, in .venv-oldest
# Extra arguments go to pytest. In every mode a dependency's DeprecationWarning or FutureWarning about a
# call in our code is an error (pyproject's filterwarnings), so a rename fails while it is only a warning.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=""; venv=.venv
case "${1:-}" in --latest|--oldest) mode=$1; venv=.venv-${1#--}; shift ;; esac
bash scripts/setup_env.sh $mode || exit 1
. "$venv/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python - <<'PY'
from mergetool.doctor import versions
print("testing with " + ", ".join(f"{k} {v}" for k, v in versions().items()))
PY
# the layers (import-linter contracts in pyproject.toml) and the lint rules, before the suite
lint-imports --no-cache --no-logo || { echo "import contracts broken (pyproject.toml [tool.importlinter])" >&2; exit 1; }
ruff check --quiet . || { echo "ruff found problems: see above (pyproject.toml [tool.ruff])" >&2; exit 1; }
python -m pytest -q --durations=15 "$@"
rc=$?
[ $rc -eq 5 ] && { echo "no tests ran: failing" >&2; exit 1; }
exit $rc
