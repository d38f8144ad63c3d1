#!/usr/bin/env bash
# TensorBoard over one run or a folder of runs:  launch/tensorboard.sh [RUN_DIR|runs] [PORT]
# On a cluster, forward the port: ssh -L 6006:localhost:6006 LOGIN_NODE
set -euo pipefail
logdir=${1:-runs}
port=${2:-6006}
[[ -d "$logdir" ]] || { echo "launch/tensorboard.sh: no such directory: $logdir" >&2; exit 2; }
exec "${PYTHON:-python}" -m tensorboard.main --logdir "$logdir" --port "$port" --bind_all
