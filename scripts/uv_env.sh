# Sourced by setup_env.sh and lock.sh: a pinned uv, pointed at the wheel sources pip is configured with.
UV_VERSION=0.13.9

# uv flags for pip's own sources (find-links, extra indexes), so uv sees the same wheels pip does.
# Like pip, uv then weighs every index for each package (unsafe-best-match is pip's behaviour).
pip_sources() {
  python -m pip config list 2>/dev/null \
    | sed -n "s/^[^=]*\.\(find-links\|extra-index-url\|index-url\)='\(.*\)'$/\1 \2/p" \
    | while read -r key values; do for v in $values; do printf -- '--%s\n%s\n' "$key" "$v"; done; done \
    | paste - - | sort -u | tr '\t' '\n'
  echo --index-strategy
  echo unsafe-best-match
}

# Install uv into the active venv; returns non-zero (and the caller falls back to pip) when it cannot.
ensure_uv() {
  [ "${MERGETOOL_NO_UV:-0}" = 1 ] && return 1
  command -v uv >/dev/null 2>&1 && [ "$(uv --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ] && return 0
  python -m pip install -q "uv==$UV_VERSION" >/dev/null 2>&1
}
