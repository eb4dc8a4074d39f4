#!/usr/bin/env bash
# Prints the path of a Python that coe-jax's pinned versions support (>= 3.11:
# jax and numpy in constraints.txt need it), getting one if the machine has none.
#
#   launch/python.sh [PYTHON]    # e.g. python="$(launch/python.sh)" && "$python" -m venv .venv
#
# PYTHON, when given, must be recent enough. Otherwise tries python3, python3.13,
# python3.12, python3.11 on the PATH. When none is recent enough (TPU VMs' tpu-ubuntu2204-base and many
# GPU nodes ship 3.10), uv installs a managed CPython 3.12 in the user's home
# (no root needed): the uv on the PATH or in ~/.local/bin, else one installed
# with `python3 -m pip install --user uv`, else uv's installer script. Fails in
# one line on stderr when no way works. The Makefile and both launchers call it.
set -euo pipefail

MIN_MINOR=11  # Python 3.MIN_MINOR or newer.
MANAGED=3.12  # The version uv installs when the machine has none.

recent_enough() {  # Whether interpreter $1 runs and is 3.MIN_MINOR or newer.
  "$1" -c "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_MINOR) else 1)" \
      >/dev/null 2>&1
}

version() {
  "$1" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo "not runnable"
}

if [[ -n "${1:-}" ]]; then
  if path="$(command -v "$1" 2>/dev/null)" && recent_enough "$path"; then echo "$path"; exit 0; fi
  echo "error: PYTHON=$1: $(if [[ -n "${path:-}" ]]; then version "$path"; else echo "not found"; fi);" \
       "coe-jax needs Python >= 3.$MIN_MINOR" >&2
  exit 1
fi
seen=()
for candidate in python3 python3.13 python3.12 python3.11; do
  path="$(command -v "$candidate" 2>/dev/null)" || continue
  if recent_enough "$path"; then echo "$path"; exit 0; fi
  seen+=("$candidate $(version "$path")")
done

export PATH="$HOME/.local/bin:$PATH"  # Where pip --user and uv's installer put uv.
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --user --quiet uv >/dev/null 2>&1 ||
      { command -v curl >/dev/null 2>&1 &&
        curl -LsSf https://astral.sh/uv/install.sh | sh >/dev/null 2>&1; } || true
fi
if command -v uv >/dev/null 2>&1 && uv python install --quiet "$MANAGED" >/dev/null 2>&1; then
  path="$(uv python find "$MANAGED" 2>/dev/null)" || path=""
  if [[ -n "$path" ]] && recent_enough "$path"; then echo "$path"; exit 0; fi
fi
found="none"
if [[ ${#seen[@]} -gt 0 ]]; then found="${seen[*]}"; fi
echo "error: coe-jax needs Python >= 3.$MIN_MINOR and this machine has $found; uv could not" \
     "install Python $MANAGED either (no uv, pip or network?): install Python 3.$MIN_MINOR+ and" \
     "rerun with PYTHON=/path/to/python3" >&2
exit 1
