#!/usr/bin/env bash
# The end-to-end RLHF demonstration on a laptop-class CPU, checked against a known gold judge:
#   pretrained PaLM (loaded, or trained first) -> preference pairs labelled by the gold judge with 10% noise
#   -> reward model (LoRA) -> PPO (LoRA actor + critic, KL to the frozen reference) -> before/after table.
# Usage: bash scripts/rlhf_demo.sh            (DATA=..., OUT=..., PRETRAINED=... to override)
set -euo pipefail
DATA=${DATA:-enwik6}      # the first 1 MB of enwik8 (fetched into data/ and checked on first use), or a file
OUT=${OUT:-checkpoints/demo}
PRETRAINED=${PRETRAINED:-checkpoints/pretrain/last.pt}
start=$(date +%s)
if [ ! -f "$PRETRAINED" ]; then
  echo "== no $PRETRAINED: pretraining first (about 10-15 minutes on 2 cores)"
  python train.py pretrain --data "$DATA" --preset cpu --steps 800 --batch-size 8 --seq-len 256 --lr 2e-3 \
    --eval-interval 100 --sample-interval 400 --checkpoint-dir "$(dirname "$PRETRAINED")" --quiet
fi
echo "== preference pairs from the pretrained model, labelled by the gold judge (10% flipped)"
python train.py make-preferences --init "$PRETRAINED" --data "$DATA" --out "$OUT/data" \
  --pairs ${PAIRS:-2000} --val-pairs 300 --demos 500 --prompt-len 32 --response-len 64 --quiet
echo "== reward model"
python train.py reward --init "$PRETRAINED" --train "$OUT/data/train.jsonl" --val "$OUT/data/val.jsonl" --gold \
  --max-len 96 --lora-r 16 --steps ${RM_STEPS:-250} --batch-size 16 --lr 1e-3 --eval-interval 50 \
  --checkpoint-dir "$OUT/reward" --quiet
echo "== PPO"
python train.py ppo --init "$PRETRAINED" --reward "$OUT/reward/model" --data "$DATA" --gold --prompt-len 32 \
  --max-new-tokens 64 --prompts-per-iter 16 --minibatch-size 8 --ppo-epochs 4 --steps ${PPO_STEPS:-40} \
  --lr 5e-4 --kl-coef 0.2 --kl-horizon 160 --target-kl 6 --eval-prompts 256 --best-of 8 --critic-from-reward \
  --checkpoint-dir "$OUT/ppo" --quiet
echo "== done in $(( $(date +%s) - start )) s; table above, curves in $OUT/ppo/ppo.png and $OUT/reward/reward.png"
