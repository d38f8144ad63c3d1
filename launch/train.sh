#!/usr/bin/env bash
# Train on one node with the DeepSpeed launcher.
#   launch/train.sh CONFIG [key=value ...]            all visible GPUs
#   launch/train.sh --gpus 4 CONFIG [key=value ...]   the first 4 GPUs
#   launch/train.sh --cpu 2 CONFIG [key=value ...]    2 CPU ranks (gloo), no GPU needed
# A pipeline (a YAML file with a top-level `stages:`) runs all its stages in one launch.
# The config is validated before any rank starts, so a typo fails in seconds.
set -euo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

cpu=0
gpus=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) cpu=${2:?--cpu needs a number}; shift 2 ;;
    --gpus) gpus=${2:?--gpus needs a number}; shift 2 ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage
PYTHON=${PYTHON:-python}
command=train
if grep -q '^stages:' "$1" 2>/dev/null; then command=pipeline; fi

"$PYTHON" -m mmtrain.cli config "$@" > /dev/null

export PYTHONUNBUFFERED=1
args=()
port=${MASTER_PORT:-29500}
if (( cpu > 0 )); then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
  args+=(--num_gpus "$cpu")
  port=${MASTER_PORT:-29512}
elif [[ -n "$gpus" ]]; then
  args+=(--num_gpus "$gpus")
fi

# The launcher runs in its own process group. A SIGTERM/SIGINT/SIGUSR1 to this script (kill, a job
# manager, a container stop, Ctrl-C) reaches the ranks as SIGUSR1: they finish the step, checkpoint
# and exit 85 (requeue), and this script exits with their code. Without this, the deepspeed
# launcher exits at once on SIGTERM and its ranks train on, orphaned. A second signal stops
# everything at once.
setsid "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --master_port "$port" \
  --no_local_rank --module mmtrain.cli "$command" "$@" &
launcher=$!
signalled=0
# shellcheck disable=SC2329  # invoked by the trap below
forward() {
  if (( signalled )); then
    kill -TERM -- "-$launcher" 2>/dev/null || true
  else
    signalled=1
    echo "launch/train.sh: stop signal: the ranks checkpoint and exit (a second signal stops them at once)" >&2
    pkill -USR1 -g "$launcher" -f " -m mmtrain[.]cli (train|pipeline)" || true   # the ranks, not the launcher
  fi
}
trap forward TERM INT USR1
while :; do
  rc=0
  wait "$launcher" || rc=$?
  # a trapped signal interrupts `wait` (status > 128) while the launcher still runs: wait again
  (( rc > 128 )) && kill -0 "$launcher" 2>/dev/null && continue
  break
done
if (( rc > 128 )); then         # it ended just as the signal came: its own status is still there
  r=0
  wait "$launcher" 2>/dev/null || r=$?
  if (( r != 127 )); then rc=$r; fi
fi
exit "$rc"
