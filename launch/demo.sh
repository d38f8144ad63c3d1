#!/usr/bin/env bash
# The demo: the main job on tiny built-in defaults, on 2 CPU ranks under ZeRO-3 (run by `make demo`).
# Each demo run gets its own directory under runs/, so nothing earlier is written over.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
name="demo_toy_lm_$(date +%Y%m%d-%H%M%S)"
bash launch/train.sh --cpu 2 configs/demo/toy_lm.yaml run.name="$name" "$@"
run_dir=$("$PYTHON" -m mmtrain.cli config --get run_dir configs/demo/toy_lm.yaml run.name="$name" "$@")
"$PYTHON" -m mmtrain.cli export "$run_dir" "$run_dir/export"
cat <<MSG

demo finished
  run directory : $run_dir   (config.yaml, train.log, eval.jsonl)
  checkpoints   : $run_dir/checkpoints   (latest -> $(cat "$run_dir/checkpoints/latest"))
  exported model: $run_dir/export   (model.safetensors, lm/ in save_pretrained layout)
  TensorBoard   : bash launch/tensorboard.sh $run_dir
MSG
