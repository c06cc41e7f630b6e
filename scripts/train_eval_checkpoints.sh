#!/usr/bin/env bash
# The distilled SmolLM2 checkpoints of the "does training pay off?" evaluation (benchmarks/eval): the G-KV and
# KQ-SVD recipes and the >= 8x composition (G-KV 87.5% x TaDA 4-bit), each with the same steps, learning rate and
# data; for G-KV and the >= 8x composition also a second seed and the full-cache control (student_cache=full: the
# same run with the student's forward uncompressed, evaluated under the same compression). Run from the
# repository root; resumable (re-run after a kill). Then: python scripts/bench_eval.py --train-only
#   STEPS=n     steps of every arm (default 100; a reduced run changes all arms alike)
#   ARMS="..."  only these arms (names below), in this order
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-100}
WARMUP=$(( STEPS / 10 ))
SAVE=$(( STEPS < 100 ? (STEPS + 1) / 2 : 50 ))
COMMON="--max_steps $STEPS --gradient_accumulation_steps 1 --learning_rate 4e-4 --block_stride 256
        --save_steps $SAVE --loyalty_blocks 0 --warmup_steps $WARMUP --resume latest --disable_tqdm true"
# name recipe seed student_cache
ALL_ARMS="gkv gkv 42 compressed
gkv-seed43 gkv 43 compressed
gkv-control gkv 42 full
kqsvd kqsvd 42 compressed
gkv-tada4 gkv-tada4 42 compressed
gkv-tada4-seed43 gkv-tada4 43 compressed
gkv-tada4-control gkv-tada4 42 full"
ARMS=${ARMS:-$(cut -d' ' -f1 <<<"$ALL_ARMS" | tr '\n' ' ')}
for arm in $ARMS; do
  read -r _ recipe seed cache < <(grep "^$arm " <<<"$ALL_ARMS") || { echo "unknown arm $arm" >&2; exit 2; }
  out=runs/eval-train/$arm
  [ -f "$out/kvtrain_training.json" ] && continue
  extra=(--config "recipes/smollm2-135m/distill/$recipe.yaml" --seed "$seed" --student_cache "$cache")
  if [ "$recipe" = kqsvd ]; then
    [ -f runs/smollm2-135m-calib-kqsvd16/kv_compression/config.json ] || \
      kvtrain calibrate --model smollm2-135m --out runs/smollm2-135m-calib-kqsvd16 --fit kqsvd --rank 16 --value-rank 16
    extra+=(--train_projections true)
  fi
  # One torch thread: on 2 shared cores a second thread mostly waits (see benchmarks/eval/README.md).
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 python train/distill.py "${extra[@]}" --output_dir "$out" $COMMON
done
