#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice, installs coe-jax on every worker, and
# runs one training job across all of them (multi-host jax.distributed).
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE --accelerator=v4-64 \
#       --config=configs/imagenet_coe_194m.py --workdir=gs://BUCKET/runs/coe194 \
#       --tfds-data-dir=gs://BUCKET/tensorflow_datasets [--version=tpu-ubuntu2204-base] \
#       [--repo=https://...coe-jax.git] [--ref=main] [-- --config.key=value ...]
#
# The workdir must be a gs:// path that every worker can write; rerunning the
# same command after a preemption resumes from its checkpoints. --dry-run
# prints the gcloud commands instead of running them.
set -euo pipefail

DRY_RUN=0
NAME="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" TFDS_DATA_DIR=""
VERSION="tpu-ubuntu2204-base"
REPO_URL="$(git -C "$(dirname "$0")/.." config --get remote.origin.url 2>/dev/null || true)"
REF="main"
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --tfds-data-dir=*) TFDS_DATA_DIR="${1#*=}" ;;
    --repo=*) REPO_URL="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

for var in NAME ZONE ACCELERATOR CONFIG WORKDIR TFDS_DATA_DIR REPO_URL; do
  if [[ -z "${!var}" ]]; then
    echo "error: missing --$(echo "$var" | tr '[:upper:]_' '[:lower:]-' | sed 's/repo-url/repo/') (see the usage at the top of $0)" >&2
    exit 2
  fi
done
if [[ "$WORKDIR" != gs://* ]]; then
  echo "error: --workdir=$WORKDIR: expected a gs:// path that all workers can write" >&2
  exit 2
fi

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# 1. The TPU VM or pod slice (skipped when it already exists).
if [[ $DRY_RUN == 1 ]] || ! gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION"
fi

# 2. Install on every worker: the repository, the package, and jax for TPUs,
#    at the versions the suite passed with (constraints.txt).
INSTALL="set -e; if [ ! -d coe-jax ]; then git clone $REPO_URL coe-jax; fi; cd coe-jax; \
git fetch -q origin $REF && git checkout -q FETCH_HEAD; \
python3 -m venv .venv && .venv/bin/pip install -q -e . -c constraints.txt && \
.venv/bin/pip install -q 'jax[tpu]' -c constraints.txt"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$INSTALL"

# 3. Train on all workers at once; jax.distributed finds the other hosts.
TRAIN="cd coe-jax && COE_DISTRIBUTED=1 TFDS_DATA_DIR=$TFDS_DATA_DIR \
.venv/bin/python -m coe_jax.main --config=$CONFIG --workdir=$WORKDIR \
--config.data.tfds_data_dir=$TFDS_DATA_DIR ${OVERRIDES[*]:-}"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$TRAIN"
