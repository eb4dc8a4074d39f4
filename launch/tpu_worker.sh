#!/usr/bin/env bash
# One worker's side of a detached pod run; launch/tpu_pod.sh calls it on every
# worker over ssh, so that a dropped connection does not stop training.
#
#   launch/tpu_worker.sh start RUN_DIR WORKDIR -- COMMAND [ARG ...]
#   launch/tpu_worker.sh status RUN_DIR
#   launch/tpu_worker.sh log RUN_DIR     # follows the log; Ctrl-C leaves the run going
#   launch/tpu_worker.sh stop RUN_DIR    # SIGTERM: the run saves a checkpoint and stops
#
# `start` runs COMMAND in its own session (setsid), detached from the
# terminal, with its output in RUN_DIR/train.log, copied every
# COE_LOG_COPY_SECONDS (default 60) and at the end to WORKDIR/logs/HOST.log
# (gcloud storage for gs:// workdirs), and its exit status in
# RUN_DIR/exit_status. It refuses to start a second run while one is alive.
set -euo pipefail

usage() { sed -n '5,8p' "$0" | sed 's/^# *//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
ACTION="$1" RUN_DIR="$2"
shift 2

running_pid() {  # The run's pid if it is alive, else nothing.
  local pid
  pid="$(cat "$RUN_DIR/pid" 2>/dev/null || true)"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

case "$ACTION" in
  start)
    [[ $# -ge 3 && "$2" == "--" ]] || usage
    WORKDIR="$1"
    shift 2
    mkdir -p "$RUN_DIR"
    if pid="$(running_pid)" && [[ -n "$pid" ]]; then
      echo "$(hostname): a run is already going (pid $pid); see its status or stop it first"
      exit 0
    fi
    rm -f "$RUN_DIR/exit_status"
    LOG="$RUN_DIR/train.log" COPY="$WORKDIR/logs/$(hostname).log"
    if [[ "$WORKDIR" == gs://* ]]; then
      COPIER="gcloud storage cp --quiet"
    else
      mkdir -p "$WORKDIR/logs"
      COPIER="cp"
    fi
    # The supervisor (in its own session) runs the command, copies the log
    # while it runs, and records how it ended.
    setsid nohup bash -c '
      log="$1" copy="$2" copier="$3" run_dir="$4" every="$5"; shift 5
      "$@" >>"$log" 2>&1 </dev/null &
      child=$!
      trap "kill -TERM $child 2>/dev/null" TERM
      while kill -0 "$child" 2>/dev/null; do
        sleep "$every" & wait $! || true
        $copier "$log" "$copy" >/dev/null 2>&1 || true
      done
      status=0; wait "$child" || status=$?
      $copier "$log" "$copy" >/dev/null 2>&1 || true
      echo "$status" >"$run_dir/exit_status"
    ' supervisor "$LOG" "$COPY" "$COPIER" "$RUN_DIR" "${COE_LOG_COPY_SECONDS:-60}" "$@" \
      >/dev/null 2>&1 </dev/null &
    echo $! >"$RUN_DIR/pid"
    echo "$(hostname): started (pid $!), log $LOG, copied to $COPY"
    ;;
  status)
    if pid="$(running_pid)" && [[ -n "$pid" ]]; then
      state="running (pid $pid)"
    elif [[ -f "$RUN_DIR/exit_status" ]]; then
      state="exited $(cat "$RUN_DIR/exit_status")"
    elif [[ -f "$RUN_DIR/pid" ]]; then
      state="stopped without an exit status (the VM restarted?)"
    else
      state="no run started"
    fi
    echo "$(hostname): $state"
    if [[ -f "$RUN_DIR/train.log" ]]; then tail -n 2 "$RUN_DIR/train.log" | sed 's/^/  /'; fi
    ;;
  log)
    exec tail -n 50 -F "$RUN_DIR/train.log"
    ;;
  stop)
    if pid="$(running_pid)" && [[ -n "$pid" ]]; then
      kill -TERM "$pid"
      echo "$(hostname): sent SIGTERM to the run (pid $pid); it saves a checkpoint and stops"
    else
      echo "$(hostname): no run is going"
    fi
    ;;
  *) usage ;;
esac
