#!/usr/bin/env bash
# TensorBoard over one run or a folder of runs, on this machine only (localhost):
#   launch/tensorboard.sh [RUN_DIR|runs] [PORT]
# On a cluster, forward the port from your own machine: ssh -L 6006:localhost:6006 NODE
# --expose serves every network interface instead: anyone who can reach the node sees the runs.
set -euo pipefail
bind=(--host 127.0.0.1)
if [[ ${1:-} == --expose ]]; then
  bind=(--bind_all)
  shift
fi
logdir=${1:-runs}
port=${2:-6006}
[[ -d "$logdir" ]] || { echo "launch/tensorboard.sh: no such directory: $logdir" >&2; exit 2; }
exec "${PYTHON:-python}" -m tensorboard.main --logdir "$logdir" --port "$port" "${bind[@]}"
