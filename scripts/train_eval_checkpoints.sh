#!/usr/bin/env bash
# The three distilled SmolLM2 checkpoints of the "does training pay off?" evaluation (benchmarks/eval): the G-KV
# and KQ-SVD recipes and the >= 8x composition (G-KV 87.5% x TaDA 4-bit), each with the same steps, learning
# rate and data. Run from the repository root; resumable (re-run after a kill). Then: python scripts/bench_eval.py
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--max_steps 100 --gradient_accumulation_steps 1 --learning_rate 4e-4 --block_stride 256 --save_steps 50
        --loyalty_blocks 0 --warmup_steps 10 --resume latest --disable_tqdm true"
[ -f runs/smollm2-135m-calib-kqsvd16/kv_compression/config.json ] || \
  kvtrain calibrate --model smollm2-135m --out runs/smollm2-135m-calib-kqsvd16 --fit kqsvd --rank 16 --value-rank 16
for arm in gkv kqsvd gkv-tada4; do
  out=runs/eval-train/$arm
  [ -f "$out/kvtrain_training.json" ] && continue
  extra=(--config "recipes/smollm2-135m/distill/$arm.yaml")
  [ "$arm" = kqsvd ] && extra+=(--train_projections true)
  # One torch thread: on 2 shared cores a second thread mostly waits (see benchmarks/eval/README.md).
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 python train/distill.py "${extra[@]}" --output_dir "$out" $COMMON
done
