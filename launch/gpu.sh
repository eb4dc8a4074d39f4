#!/usr/bin/env bash
# Trains and evaluates CoE on NVIDIA GPUs: one node with all its GPUs in one
# process, several nodes with one process each, or a SLURM job of several nodes.
#
#   launch/gpu.sh [--dry-run] [--no-install] [--mem-fraction=F] --config=CONFIG \
#       --workdir=WORKDIR [-- --config.key=value ...]
#   launch/gpu.sh ... --coordinator=HOST:PORT --num-processes=N --process-id=I
#   launch/gpu.sh ... --slurm --nodes=N [--gpus-per-node=G] [--partition=P] \
#       [--time=HH:MM:SS] [--port=8476]
#
# Several nodes: run the same command on every node, each with its own
# --process-id (0 to N-1); process 0 runs on HOST and serves the others on
# PORT. COE_COORDINATOR_ADDRESS, COE_NUM_PROCESSES and COE_PROCESS_ID in the
# environment stand for the three flags.
#
# --slurm, from a login node: writes the job script WORKDIR/slurm/train.sbatch
# (its log: WORKDIR/slurm/JOBID.out) and submits it with sbatch. The job
# installs once, on its first node, and runs one process per node with all
# of that node's GPUs, process 0 on the first node; this checkout and WORKDIR
# must be on a file system that all nodes share.
#
# First installs the package with jax's CUDA 12 plugin into the checkout's
# .venv (launch/install.sh: a Python >= 3.11, got with uv where the node has
# none; the versions of constraints.txt and constraints-cuda.txt); --no-install
# skips that (on all nodes but one that share this checkout: install once).
# --mem-fraction=F lets JAX allocate F of each GPU's memory
# (XLA_CLIENT_MEM_FRACTION; JAX's default is 0.75, and `coe_jax.plan` plans
# against the same share: --mem_fraction). Rerunning the same command resumes from WORKDIR's
# checkpoints. --dry-run prints the commands (for --slurm, those that write
# the job script, with its text, and submit it) instead of running them.
set -euo pipefail

DRY_RUN=0 INSTALL=1 SLURM=0
CONFIG="" WORKDIR="" MEM_FRACTION=""
# Each of the three from its flag, else from the environment; *_KEY names
# where it came from, for the error messages.
COORDINATOR="${COE_COORDINATOR_ADDRESS:-}" COORDINATOR_KEY=COE_COORDINATOR_ADDRESS
NUM_PROCESSES="${COE_NUM_PROCESSES:-}" NUM_PROCESSES_KEY=COE_NUM_PROCESSES
PROCESS_ID="${COE_PROCESS_ID:-}" PROCESS_ID_KEY=COE_PROCESS_ID
CLUSTER_FLAG=""  # The first of these flags given.
NODES="" GPUS_PER_NODE="" PARTITION="" TIME="" PORT=""
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) INSTALL=0 ;;
    --mem-fraction=*) MEM_FRACTION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --coordinator=*)
      COORDINATOR="${1#*=}" COORDINATOR_KEY=--coordinator CLUSTER_FLAG="${CLUSTER_FLAG:-$1}" ;;
    --num-processes=*)
      NUM_PROCESSES="${1#*=}" NUM_PROCESSES_KEY=--num-processes CLUSTER_FLAG="${CLUSTER_FLAG:-$1}" ;;
    --process-id=*)
      PROCESS_ID="${1#*=}" PROCESS_ID_KEY=--process-id CLUSTER_FLAG="${CLUSTER_FLAG:-$1}" ;;
    --slurm) SLURM=1 ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS_PER_NODE="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "error: unknown argument $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
  shift
done

die() {
  echo "error: $*" >&2
  exit 2
}
# Whether $1 is a whole number of at least $2 (base 10, even with leading zeros).
at_least() {
  [[ "$1" =~ ^[0-9]{1,9}$ ]] && (( 10#$1 >= $2 ))
}

[[ -n "$CONFIG" ]] || die "missing --config (see the usage at the top of $0)"
[[ -n "$WORKDIR" ]] || die "missing --workdir (see the usage at the top of $0)"
[[ -z "$MEM_FRACTION" || "$MEM_FRACTION" =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
    die "--mem-fraction=$MEM_FRACTION: expected a share of each GPU's memory in (0, 1], e.g. 0.9"
if [[ $SLURM == 1 ]]; then
  [[ -z "$CLUSTER_FLAG" ]] || die "$CLUSTER_FLAG: not with --slurm, which takes the processes from SLURM"
  [[ -n "$NODES" ]] || die "--slurm needs --nodes=N"
  at_least "$NODES" 1 || die "--nodes=$NODES: expected an integer >= 1"
  [[ -z "$GPUS_PER_NODE" ]] || at_least "$GPUS_PER_NODE" 1 ||
      die "--gpus-per-node=$GPUS_PER_NODE: expected an integer >= 1"
  PORT="${PORT:-8476}"
  at_least "$PORT" 1 && (( 10#$PORT < 65536 )) || die "--port=$PORT: expected a port number from 1 to 65535"
  [[ "$WORKDIR" != *://* ]] ||
      die "--workdir=$WORKDIR: with --slurm, expected a path on the nodes' shared file system (the job's log goes there)"
else
  for flag in --nodes="$NODES" --gpus-per-node="$GPUS_PER_NODE" --partition="$PARTITION" \
              --time="$TIME" --port="$PORT"; do
    [[ "$flag" == *= ]] || die "$flag: only with --slurm"
  done
  if [[ -n "$COORDINATOR$NUM_PROCESSES$PROCESS_ID" ]]; then
    together="--coordinator, --num-processes and --process-id go together"
    [[ -n "$COORDINATOR" ]] || die "missing --coordinator=HOST:PORT ($together)"
    [[ -n "$NUM_PROCESSES" ]] || die "missing --num-processes=N ($together)"
    [[ -n "$PROCESS_ID" ]] || die "missing --process-id=I ($together)"
    [[ "$COORDINATOR" =~ ^[^[:space:]]+:[0-9]{1,5}$ ]] ||
        die "$COORDINATOR_KEY=$COORDINATOR: expected HOST:PORT, process 0's host and a port number"
    at_least "$NUM_PROCESSES" 1 ||
        die "$NUM_PROCESSES_KEY=$NUM_PROCESSES: expected an integer >= 1"
    at_least "$PROCESS_ID" 0 && (( 10#$PROCESS_ID < 10#$NUM_PROCESSES )) ||
        die "$PROCESS_ID_KEY=$PROCESS_ID: expected an integer from 0 to $((10#$NUM_PROCESSES - 1)) (the number of processes - 1)"
  fi
fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
INSTALL_CUDA=(bash "$REPO/launch/install.sh" cuda)

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
# The words, quoted for the shell, one space apart.
quote() {
  local words
  printf -v words '%q ' "$@"
  printf '%s' "${words% }"
}

if [[ $SLURM == 0 ]]; then
  # --platform=gpu: stop in one line rather than train on the CPU when jax finds no GPU.
  TRAIN=("$REPO/.venv/bin/python" -m coe_jax.main --platform=gpu --config="$CONFIG"
         --workdir="$WORKDIR")
  if [[ -n "$MEM_FRACTION" ]]; then TRAIN=(env "XLA_CLIENT_MEM_FRACTION=$MEM_FRACTION" "${TRAIN[@]}"); fi
  if [[ -n "$COORDINATOR" ]]; then
    TRAIN+=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES"
            --process_id="$PROCESS_ID")
  fi
  TRAIN+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  if [[ $INSTALL == 1 ]]; then
    run "${INSTALL_CUDA[@]}"
  fi
  # exec: a signal to this process (a scheduler's SIGTERM) reaches main, which
  # saves a checkpoint before it exits.
  if [[ $DRY_RUN == 1 ]]; then run "${TRAIN[@]}"; exit 0; fi
  exec "${TRAIN[@]}"
fi

# SLURM. The job script stays in the workdir, beside its log and checkpoints:
# a record of how the run was started, and `sbatch` on it again resumes it.
JOB_DIR="$WORKDIR/slurm"
JOB="$JOB_DIR/train.sbatch"
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=coe-jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
${GPUS_PER_NODE:+#SBATCH --gpus-per-node=$GPUS_PER_NODE
}${PARTITION:+#SBATCH --partition=$PARTITION
}${TIME:+#SBATCH --time=$TIME
}#SBATCH --output=$JOB_DIR/%j.out
# Written by launch/gpu.sh. One process per node with all its GPUs, joined
# through process 0 on the first node. Relative paths are relative to the
# directory sbatch ran in (SLURM's default working directory).
set -euo pipefail
"
if [[ $INSTALL == 1 ]]; then
  SCRIPT+="# Once, on the first node: the nodes share the checkout.
$(quote "${INSTALL_CUDA[@]}")
"
fi
SCRIPT+="# sed, not head, reads all the names: head could close the pipe early, a
# failure under pipefail.
FIRST_NODE=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p)\"
# One task per node; in the single quotes, each task's shell expands its own
# \$SLURM_PROCID (and the step's \$SLURM_NTASKS). --kill-on-bad-exit: when one
# process fails, the others stop instead of waiting for it.
exec srun --kill-on-bad-exit=1 \\
    bash -c 'exec bash \"\$0\" --num-processes=\"\$SLURM_NTASKS\" --process-id=\"\$SLURM_PROCID\" \"\$@\"' \\
    $(quote "$REPO/launch/gpu.sh" --no-install ${MEM_FRACTION:+--mem-fraction="$MEM_FRACTION"} --config="$CONFIG" --workdir="$WORKDIR") \\
    --coordinator=\"\$FIRST_NODE:$PORT\"${OVERRIDES[@]+ -- $(quote "${OVERRIDES[@]}")}"

if [[ $DRY_RUN == 1 ]]; then
  run mkdir -p "$JOB_DIR"
  printf 'cat > %q <<'"'EOF'"'\n%s\nEOF\n' "$JOB" "$SCRIPT"
else
  mkdir -p "$JOB_DIR"
  printf '%s\n' "$SCRIPT" > "$JOB"
fi
run sbatch "$JOB"
