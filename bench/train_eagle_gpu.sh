#!/usr/bin/env bash
# Train the EAGLE-2 head for SmolLM2-135M-Instruct on the GPU machine (H100), repo root as cwd.
# Writes $OUT/eagle_smollm2/{model.safetensors,config.json,train_log.txt}. Time-boxed: generation
# stops after GEN_S seconds, training after TRAIN_S, so the whole run stays under ~6 minutes.
# Needs ../shared/data (WikiText-2 valid; GSM8K questions too when pyarrow or pandas is installed).
set -euo pipefail
MODEL=${MODEL:-/root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-out}
GEN_S=${GEN_S:-150}
TRAIN_S=${TRAIN_S:-120}
mkdir -p "$OUT/eagle_smollm2"
python3 -m specq.spec.train_eagle --model "$MODEL" --out "$OUT/eagle_smollm2" --device cuda \
  --num-prompts 2048 --max-new-tokens 256 --gen-batch 128 --gen-budget-s "$GEN_S" \
  --epochs ${EPOCHS:-8} --lr 5e-4 --batch-tokens 8192 --noise 0.05 --train-budget-s "$TRAIN_S" \
  --features /tmp/specq_eagle_smollm2_feats.safetensors --log "$OUT/eagle_smollm2/train_log.txt" 2>&1 \
  | tee "$OUT/eagle_smollm2/console.txt"
ls -la "$OUT/eagle_smollm2"
