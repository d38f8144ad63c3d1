#!/usr/bin/env bash
# The demo (run by `make demo`), every recipe at tiny size on 2 CPU ranks under ZeRO-3:
#   vikdf : stage 1 (IQ-Former distillation), stage 2 fusion (BVIF into a frozen LLM), zero-resource
#           dialogue fine-tuning, then generation and dialogue metrics on the validation dialogues;
#   dyncot: Dynamic CoT keyphrase prediction with a tiny Qwen2-VL (zero-shot vs dynamic CoT, F1@k);
#   kdsl  : decoupled post-training (scene + intent adapters), a small model's MCTS rule base,
#           collaborative prediction, the seesaw rows (weighted F1).
# `bash launch/demo.sh dyncot` runs one part. Synthetic shards and tiny checkpoints are made here
# on first use. Each run gets its own directory under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
mm() { "$PYTHON" -m mmtrain.cli "$@"; }

[[ -f data/synth/image-text/train/manifest.json ]] || mm data synth --kind image-text --out data/synth/image-text --n 3000
[[ -f data/synth/dialogue/train/manifest.json ]] || mm data synth --kind dialogue --out data/synth/dialogue --n 2000
[[ -f data/synth/keyphrase/train/manifest.json ]] || mm data synth --kind keyphrase --out data/synth/keyphrase --n 600
[[ -f data/synth/intent/train/manifest.json ]] || mm data synth --kind intent --out data/synth/intent --n 400
[[ -f data/tiny/qwen2vl/config.json ]] || mm models tiny --out data/tiny
parts=${*:-vikdf dyncot kdsl}

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

vikdf() {
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

VIKDF runs (config.yaml, train.log, eval.jsonl, checkpoints/, export/, tensorboard/):
  stage 1 (IQ-Former)   : $s1   (export/iqformer loads with IQFormer.from_pretrained)
  stage 2 fusion (BVIF) : $fusion
  dialogue fine-tuning  : $dialogue   (eval_val_*.json, predictions_val_*.jsonl)
MSG
}

dyncot() {
  local zero dyn
  zero=$(train configs/demo/dyncot.yaml "demo_dyncot_zero_shot_$stamp" recipe.strategy=zero_shot train.steps=0)
  dyn=$(train configs/demo/dyncot.yaml "demo_dyncot_dynamic_$stamp" recipe.strategy=dynamic)
  for run in "$zero" "$dyn"; do
    MASTER_PORT=${MASTER_PORT:-29513} "$PYTHON" -m torch.distributed.run --nproc_per_node 2 -m mmtrain.cli eval \
      "$run" --split test > "$run/eval_test.out"
  done
  "$PYTHON" - "$zero" "$dyn" <<'PY'
import json, sys
for name, run in zip(("zero-shot", "dynamic CoT"), sys.argv[1:]):
    d = json.loads(open(f"{run}/eval_test.out").read().splitlines()[-1])
    print(f"keyphrases, test ({d['n']} posts, {d['kp_overlap_with_train']:.0%} of gold keyphrases seen in training), "
          f"{name}: F1@1 {d['f1@1']:.3f} F1@3 {d['f1@3']:.3f} F1@5 {d['f1@5']:.3f}; present F1@3 "
          f"{d['present_f1@3']:.3f}, absent {d['absent_f1@3']:.3f}, unseen {d['unseen_f1@3']:.3f}; "
          f"reasons on {d['think_rate']:.0%}, {d['mean_gen_tokens']:.1f} tokens generated")
last = open(f"{sys.argv[2]}/dynamic_cot.jsonl").read().splitlines()[-1]
print(f"dynamic CoT decision: {last}")
PY
  cat <<MSG

Dynamic CoT runs: $zero (zero-shot), $dyn (dynamic; dynamic_cot.jsonl, predictions_test_*.jsonl)
MSG
}

kdsl() {
  local large joint small
  large=$(train configs/demo/kdsl.yaml "demo_kdsl_decoupled_$stamp")
  joint=$(train configs/demo/kdsl.yaml "demo_kdsl_joint_$stamp" recipe.mode=joint)
  small=$(train configs/demo/kdsl.yaml "demo_kdsl_small_$stamp" "recipe.tasks=[scene]" recipe.mode=joint train.steps=40)
  mm kdsl mine "$small" --out "$large/rules" > "$large/rules.txt"
  for run in "$joint" "$large"; do
    MASTER_PORT=${MASTER_PORT:-29513} "$PYTHON" -m torch.distributed.run --nproc_per_node 2 -m mmtrain.cli eval \
      "$run" --split test --set recipe.rules="$large/rules/rules.json" > /dev/null
  done
  echo
  grep '^IF' "$large/rules.txt" | head -n 5
  echo "... $(grep -c '^IF' "$large/rules.txt") rules in $large/rules/rules.json"
  mm kdsl seesaw "joint=$joint" "decoupled=$large" --out "$large/seesaw.md"
  cat <<MSG

KDSL runs: $large (decoupled; rules/, seesaw.md), $joint (joint), $small (small model)
MSG
}

for part in $parts; do
  case $part in
    vikdf|dyncot|kdsl) "$part" ;;
    *) echo "unknown demo part '$part' (known: vikdf dyncot kdsl)" >&2; exit 2 ;;
  esac
done
echo "TensorBoard: bash launch/tensorboard.sh runs"
