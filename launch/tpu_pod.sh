#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice, installs coe-jax on every worker, and
# starts one training job across all of them (multi-host jax.distributed),
# detached: it keeps going when the connection drops.
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE --accelerator=v4-64 \
#       --config=configs/imagenet_coe_194m.py --workdir=gs://BUCKET/runs/coe194 \
#       --tfds-data-dir=gs://BUCKET/tensorflow_datasets [--version=RUNTIME] \
#       [--spot] [--queued] [--repo=https://...coe-jax.git] [--ref=main] \
#       [-- --config.key=value ...]
#   launch/tpu_pod.sh --status --name=NAME --zone=ZONE  # each worker: running/exited, last log lines
#   launch/tpu_pod.sh --attach --name=NAME --zone=ZONE  # follow worker 0's log (Ctrl-C detaches)
#   launch/tpu_pod.sh --stop --name=NAME --zone=ZONE    # checkpoint and stop
#   launch/tpu_pod.sh --help
#
# The workers run the code of --repo (this checkout's origin by default) at
# --ref (main by default), cloned on each worker: not this checkout. Push
# your changes, or give --ref=BRANCH or a commit, before launching them.
# --version is the TPU VM's runtime image, by default the one for the
# accelerator's generation (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite,
# v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e). Each worker installs with
# launch/install.sh, which gets a Python >= 3.11 through uv where the image
# has only 3.10. Plan the memory first: python -m coe_jax.plan
# --config=CONFIG --accelerator=TYPE [the same --config.key=value ...].
#
# The workdir must be a gs:// path that every worker can write; each worker's
# log is copied to WORKDIR/logs/ every minute. Rerunning the same command
# resumes from the workdir's checkpoints: on a VM that was preempted
# (--spot) or suspended (--queued, a queued resource), it deletes and
# recreates the VM first; one still being created or provisioned is waited
# for. --dry-run reads the VM's state and prints the commands that would
# change anything instead of running them.
set -euo pipefail

DRY_RUN=0 ACTION=launch SPOT=0 QUEUED=0
NAME="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" TFDS_DATA_DIR=""
VERSION=""
REPO_URL="$(git -C "$(dirname "$0")/.." config --get remote.origin.url 2>/dev/null || true)"
REF="main"
OVERRIDES=()
POLL_SECONDS="${COE_POLL_SECONDS:-30}"  # between looks at a VM being created or provisioned
RUN_DIR='~/coe-run'  # on each worker: the detached run's pid, exit status and log
while [[ $# -gt 0 ]]; do
  case "$1" in
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --status) ACTION=status ;;
    --attach) ACTION=attach ;;
    --stop) ACTION=stop ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
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

REQUIRED=(NAME ZONE)
if [[ $ACTION == launch ]]; then REQUIRED+=(ACCELERATOR CONFIG WORKDIR TFDS_DATA_DIR REPO_URL); fi
for var in ${REQUIRED[@]+"${REQUIRED[@]}"}; do
  if [[ -z "${!var}" ]]; then
    echo "error: missing --$(echo "$var" | tr '[:upper:]_' '[:lower:]-' | sed 's/repo-url/repo/') (see the usage at the top of $0)" >&2
    exit 2
  fi
done
if [[ $ACTION == launch && "$WORKDIR" != gs://* ]]; then
  echo "error: --workdir=$WORKDIR: expected a gs:// path that all workers can write" >&2
  exit 2
fi
if [[ $ACTION == launch && -z "$VERSION" ]]; then
  case "$ACCELERATOR" in  # The runtime images Cloud TPU documents for each generation.
    v2-*|v3-*|v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) echo "error: --accelerator=$ACCELERATOR: no default runtime for it; expected v2-, v3-," \
            "v4-, v5litepod-, v5p- or v6e-N, or give --version" >&2; exit 2 ;;
  esac
fi

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_workers() {  # on_workers WORKERS COMMAND: one shell command on the TPU VM's workers.
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker="$1" --command="$2"
}
WORKER_SCRIPT="cd coe-jax && launch/tpu_worker.sh"

case $ACTION in
  status) on_workers all "$WORKER_SCRIPT status $RUN_DIR"; exit ;;
  attach) on_workers 0 "$WORKER_SCRIPT log $RUN_DIR"; exit ;;
  stop) on_workers all "$WORKER_SCRIPT stop $RUN_DIR"; exit ;;
esac

# 1. A ready TPU VM. A queued resource's state is that of the request (its VM
#    is named alike); a VM that was preempted, terminated or suspended still
#    exists and is deleted before it is created again.
if [[ $QUEUED == 1 ]]; then
  RESOURCE=(gcloud compute tpus queued-resources)
  STATE_FIELD="state.state"
else
  RESOURCE=(gcloud compute tpus tpu-vm)
  STATE_FIELD="state"
fi
vm_state() {  # The state in capitals, or ABSENT.
  local state
  state="$(${RESOURCE[@]+"${RESOURCE[@]}"} describe "$NAME" --zone="$ZONE" --format="value($STATE_FIELD)" \
    2>/dev/null)" || state=""
  echo "${state:-ABSENT}"
}
create_vm() {
  local spot=()
  if [[ $SPOT == 1 ]]; then spot=(--spot); fi
  if [[ $QUEUED == 1 ]]; then
    run ${RESOURCE[@]+"${RESOURCE[@]}"} create "$NAME" --node-id="$NAME" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" ${spot[@]+"${spot[@]}"}
  else
    run ${RESOURCE[@]+"${RESOURCE[@]}"} create "$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
        --version="$VERSION" ${spot[@]+"${spot[@]}"}
  fi
}
delete_vm() {
  if [[ $QUEUED == 1 ]]; then
    run ${RESOURCE[@]+"${RESOURCE[@]}"} delete "$NAME" --zone="$ZONE" --force --quiet
  else
    run ${RESOURCE[@]+"${RESOURCE[@]}"} delete "$NAME" --zone="$ZONE" --quiet
  fi
}
while true; do
  STATE="$(vm_state)"
  case $STATE in
    READY|ACTIVE) break ;;
    ABSENT) create_vm ;;
    PREEMPTED|TERMINATED|SUSPENDED|FAILED)
      echo "$NAME is $STATE: deleting and creating it again; training resumes from $WORKDIR" >&2
      delete_vm
      create_vm ;;
    STOPPED) run gcloud compute tpus tpu-vm start "$NAME" --zone="$ZONE" ;;
    *) echo "$NAME is $STATE: waiting for it to be ready" >&2
       [[ $DRY_RUN == 1 ]] || sleep "$POLL_SECONDS" ;;
  esac
  if [[ $DRY_RUN == 1 ]]; then break; fi  # Nothing was changed, so nothing to wait for.
done

# 2. Install on every worker: the repository at --ref, a Python the pins
#    support, the package and jax for TPUs, at the versions the suite passed
#    with (launch/install.sh, constraints.txt).
INSTALL="set -e; if [ ! -d coe-jax ]; then git clone $REPO_URL coe-jax; fi; cd coe-jax; \
git fetch -q origin $REF && git checkout -q FETCH_HEAD; launch/install.sh tpu"
on_workers all "$INSTALL"

# 3. Train on all workers at once, detached (launch/tpu_worker.sh);
#    jax.distributed finds the other hosts.
TRAIN=(env COE_DISTRIBUTED=1 "TFDS_DATA_DIR=$TFDS_DATA_DIR" .venv/bin/python -m coe_jax.main
       --platform=tpu "--config=$CONFIG" "--workdir=$WORKDIR" "--config.data.tfds_data_dir=$TFDS_DATA_DIR"
       ${OVERRIDES[@]+"${OVERRIDES[@]}"})
on_workers all "$WORKER_SCRIPT start $RUN_DIR $(printf '%q' "$WORKDIR") -- $(printf '%q ' "${TRAIN[@]}")"
if [[ $DRY_RUN == 0 ]]; then
  echo "training in the background; follow it with: $0 --attach --name=$NAME --zone=$ZONE" \
       "(or --status, --stop)"
fi
