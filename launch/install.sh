#!/usr/bin/env bash
# Installs coe-jax for training into this checkout's .venv, at the versions the
# suite passed with; launch/gpu.sh and launch/tpu_pod.sh (on every worker) call it.
#
#   launch/install.sh cuda|tpu|cpu
#
# The venv's Python is one the pins support (launch/python.sh: uv installs one
# where the node has none, as TPU VMs' Ubuntu 22.04 images); a venv left by an
# older Python is made again. Only what training needs is installed (not the
# test or serving extras): on aarch64 GPU nodes (GH200, GB200), where
# TensorFlow has no wheel, training runs without it (docs/gpu.md).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
EXTRA="${1:-}"
case "$EXTRA" in
  cuda|tpu|cpu) ;;
  *) echo "error: launch/install.sh '$EXTRA': expected cuda, tpu or cpu" >&2; exit 2 ;;
esac
VENV="$REPO/.venv"
if ! "$REPO/launch/python.sh" "$VENV/bin/python" >/dev/null 2>&1; then
  python="$("$REPO/launch/python.sh")"
  "$python" -m venv --clear "$VENV"
fi
CONSTRAINTS=(-c "$REPO/constraints.txt")
if [[ $EXTRA == cuda ]]; then CONSTRAINTS+=(-c "$REPO/constraints-cuda.txt"); fi
TARGET="$REPO"
if [[ $EXTRA != cpu ]]; then TARGET="$REPO[$EXTRA]"; fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -e "$TARGET" "${CONSTRAINTS[@]}"
