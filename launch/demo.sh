#!/usr/bin/env bash
# The demo (run by `make demo`): VIKDF stage 1 at tiny size on 2 CPU ranks under ZeRO-3, on
# synthetic image-text shards with tiny random frozen towers, both made here on first use.
# Each run gets its own directory under runs/, so nothing earlier is written over.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
mm() { "$PYTHON" -m mmtrain.cli "$@"; }

[[ -f data/synth/image-text/train/manifest.json ]] || mm data synth --kind image-text --out data/synth/image-text --n 3000
[[ -f data/tiny/clip/config.json ]] || mm models tiny --out data/tiny

config=configs/demo/vikdf_stage1.yaml
name="demo_vikdf_stage1_$(date +%Y%m%d-%H%M%S)"
bash launch/train.sh --cpu 2 "$config" run.name="$name" log.progress=false "$@"
run_dir=$(mm config --get run_dir "$config" run.name="$name" "$@")
mm export "$run_dir" "$run_dir/export" > /dev/null
"$PYTHON" - "$run_dir" <<'PY'
import json, sys
last = json.loads(open(f"{sys.argv[1]}/eval.jsonl").read().splitlines()[-1])
print(f"\nheld-out retrieval after {last['step']} steps ({int(last['n'])} pairs): "
      f"R@1 {last['mean_r@1']:.3f} (chance {last['chance_r@1']:.4f}, {last['mean_r@1'] / last['chance_r@1']:.0f}x), "
      f"R@5 {last['mean_r@5']:.3f}, R@10 {last['mean_r@10']:.3f}")
PY
cat <<MSG

demo finished
  run directory : $run_dir   (config.yaml, train.log, eval.jsonl)
  checkpoints   : $run_dir/checkpoints   (latest -> $(cat "$run_dir/checkpoints/latest"))
  exported model: $run_dir/export   (model.safetensors, iqformer/ loads with IQFormer.from_pretrained)
  TensorBoard   : bash launch/tensorboard.sh $run_dir
MSG
