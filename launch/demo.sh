#!/usr/bin/env bash
# The demo (run by `make demo`): every method at tiny size on 2 CPU ranks (ZeRO-2 at these widths:
# configs/demo/pipelines/ says why), each a pipeline, all in one launch:
#   vikdf : stage 1 (IQ-Former distillation) -> stage 2 fusion (BVIF into a frozen LLM) ->
#           zero-resource dialogue fine-tuning -> generation and dialogue metrics (validation);
#   dyncot: Dynamic CoT keyphrase prediction with a tiny Qwen2-VL: zero-shot vs dynamic CoT (F1@k);
#   kdsl  : decoupled and joint post-training, a small model's MCTS rules, collaborative
#           prediction, the seesaw table (weighted F1).
# `bash launch/demo.sh dyncot` runs one part. Synthetic shards and tiny checkpoints are made on
# first use. The terminal shows one line per stage and its figures; everything else goes to
# runs/demo_<part>_<time>/launch.log and each stage's train.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHON
mm() { "$PYTHON" -m mmtrain.cli "$@"; }

quietly() {  # quietly LOG CMD...: CMD's output to LOG, shown only if it fails
  local log=$1
  shift
  if ! "$@" > "$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "demo: '$*' failed (log: $log)" >&2
    exit 1
  fi
}

make_shards() {
  mm data synth --kind image-text --out data/synth/image-text --n 3000
  mm data synth --kind dialogue --out data/synth/dialogue --n 2000
  mm data synth --kind keyphrase --out data/synth/keyphrase --n 600
  mm data synth --kind intent --out data/synth/intent --n 400
}

make_data() {  # the shards and the tiny models (their LLM pretrains for ~25 s) side by side
  make_shards &
  local shards=$!
  mm models tiny --out data/tiny
  wait "$shards"
}

mkdir -p data
if [[ ! -f data/tiny/qwen2vl/config.json ]]; then
  echo "demo: synthetic data and tiny models, made once (data/, log: data/make.log)"
  quietly data/make.log make_data
fi

parts=("$@")
(( ${#parts[@]} )) || parts=(vikdf dyncot kdsl)
pipelines=()
for part in "${parts[@]}"; do
  [[ -f configs/demo/pipelines/$part.yaml ]] || { echo "unknown demo part '$part' (known: vikdf dyncot kdsl)" >&2; exit 2; }
  pipelines+=("configs/demo/pipelines/$part.yaml")
done
out=runs/demo_$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
for part in "${parts[@]}"; do  # configs/demo/pipelines/<part>.yaml names itself <part>
  mkdir -p "$out/$part"
  : > "$out/$part/pipeline.log"
done
# every pipeline in one launch (the ranks start once); its output to launch.log
bash launch/train.sh --cpu 2 "${pipelines[@]}" out_dir="$out" log.progress=false > "$out/launch.log" 2>&1 &
launch=$!
for part in "${parts[@]}"; do  # each pipeline's own lines, as they come
  tail -n +1 -f --pid="$launch" "$out/$part/pipeline.log" | sed -u 's/^[^ ]* [^ ]* //' &
done
rc=0
wait "$launch" || rc=$?
wait
if (( rc != 0 )); then
  grep -v "^\[20" "$out/launch.log" | tail -n 30 >&2
  echo "demo: failed (exit $rc; log: $out/launch.log)" >&2
  exit "$rc"
fi
echo
echo "runs: $out/<method>/<stage>/ (config.yaml, train.log, eval.jsonl, checkpoints/, tensorboard/)"
echo "TensorBoard: bash launch/tensorboard.sh $out   (then open http://localhost:6006)"
