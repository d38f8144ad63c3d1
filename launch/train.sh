#!/usr/bin/env bash
# Train on one node with the DeepSpeed launcher.
#   launch/train.sh CONFIG [key=value ...]            all visible GPUs
#   launch/train.sh --gpus 4 CONFIG [key=value ...]   the first 4 GPUs
#   launch/train.sh --cpu 2 CONFIG [key=value ...]    2 CPU ranks (gloo), no GPU needed
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

"$PYTHON" -m mmtrain.cli config "$@" > /dev/null

export PYTHONUNBUFFERED=1
if (( cpu > 0 )); then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
  exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$cpu" --master_port "${MASTER_PORT:-29512}" \
    --no_local_rank --module mmtrain.cli train "$@"
fi
args=()
[[ -n "$gpus" ]] && args+=(--num_gpus "$gpus")
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module mmtrain.cli train "$@"
