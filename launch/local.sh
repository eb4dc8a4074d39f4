#!/usr/bin/env bash
# Trains and evaluates CoE on this machine, resuming from WORKDIR if it holds checkpoints.
#
#   launch/local.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh configs/digits.py runs/digits --config.train.num_steps=600
#
# --dry-run prints the commands instead of running them.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
REPO="$(cd "$(dirname "$0")/.." && pwd)"

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

run make -C "$REPO" venv
run "$REPO/.venv/bin/python" -m coe_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
