#!/usr/bin/env bash
# The demo (run by `make demo`): VIKDF at tiny size on 2 CPU ranks under ZeRO-3 -- stage 1
# (IQ-Former distillation), stage 2 fusion (BVIF into a frozen LLM), zero-resource dialogue
# fine-tuning, then generation and dialogue metrics on the validation dialogues. Synthetic shards
# and tiny checkpoints are made here on first use. Each run gets its own directory under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
mm() { "$PYTHON" -m mmtrain.cli "$@"; }

[[ -f data/synth/image-text/train/manifest.json ]] || mm data synth --kind image-text --out data/synth/image-text --n 3000
[[ -f data/synth/dialogue/train/manifest.json ]] || mm data synth --kind dialogue --out data/synth/dialogue --n 2000
[[ -f data/tiny/llama/config.json ]] || mm models tiny --out data/tiny

stamp=$(date +%Y%m%d-%H%M%S)
train() {  # train CONFIG NAME [overrides]: prints the run directory
  local config=$1 name=$2
  shift 2
  bash launch/train.sh --cpu 2 "$config" run.name="$name" log.progress=false "$@" >&2
  local dir
  dir=$(mm config --get run_dir "$config" run.name="$name" "$@")
  mm export "$dir" "$dir/export" > /dev/null
  echo "$dir"
}

s1=$(train configs/demo/vikdf_stage1.yaml "demo_vikdf_stage1_$stamp")
fusion=$(train configs/demo/vikdf_fusion.yaml "demo_vikdf_fusion_$stamp" recipe.stage1="$s1/export")
dialogue=$(train configs/demo/vikdf_dialogue.yaml "demo_vikdf_dialogue_$stamp" recipe.stage1="$s1/export" \
           recipe.init_from="$fusion/export")
MASTER_PORT=${MASTER_PORT:-29513} "$PYTHON" -m torch.distributed.run --nproc_per_node 2 -m mmtrain.cli eval \
  "$dialogue" --split val > "$dialogue/eval_val.out"
"$PYTHON" - "$s1" "$dialogue" <<'PY'
import json, sys
last = json.loads(open(f"{sys.argv[1]}/eval.jsonl").read().splitlines()[-1])
print(f"\nstage 1, held-out retrieval after {last['step']} steps ({int(last['n'])} pairs): "
      f"R@1 {last['mean_r@1']:.3f} (chance {last['chance_r@1']:.4f}, {last['mean_r@1'] / last['chance_r@1']:.0f}x), "
      f"R@5 {last['mean_r@5']:.3f}, R@10 {last['mean_r@10']:.3f}")
d = json.loads(open(f"{sys.argv[2]}/eval_val.out").read().splitlines()[-1])
print(f"dialogue, validation ({d['n']} dialogues, knowledge from the LLM's prior): perplexity {d['ppl']:.3f}, "
      f"BLEU-1 {d['bleu1']:.3f}, BLEU-2 {d['bleu2']:.3f}, ROUGE-L {d['rougeL']:.3f}, "
      f"Distinct-1 {d['distinct1']:.3f}, Distinct-2 {d['distinct2']:.3f}")
PY
cat <<MSG

demo finished; runs (config.yaml, train.log, eval.jsonl, checkpoints/, export/, tensorboard/):
  stage 1 (IQ-Former)   : $s1   (export/iqformer loads with IQFormer.from_pretrained)
  stage 2 fusion (BVIF) : $fusion
  dialogue fine-tuning  : $dialogue   (eval_val_*.json, predictions_val_*.jsonl)
  TensorBoard           : bash launch/tensorboard.sh runs
MSG
