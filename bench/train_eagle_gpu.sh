#!/usr/bin/env bash
# Train the EAGLE-2 head for SmolLM2-135M-Instruct on the GPU machine (H100) in ONE run of <= 540 s,
# repo root as cwd:
#   MODEL=/root/models/SmolLM2-135M-Instruct.Q4_1.gguf SPECQ_DATA=/path/to/data OUT=out bash bench/train_eagle_gpu.sh
# Writes $OUT/eagle_smollm2/{model.safetensors,config.json,train_log.txt,console.txt}.
# Data: SPECQ_DATA holds wikitext2_valid.txt and, for the GSM8K share of prompts, gsm8k_train.jsonl (the GPU box
# has no pyarrow: make it with `python -m specq.data export DIR` on a machine that has). Without GSM8K the
# prompts are WikiText tasks and coding requests only (a warning says so).
# What it does (specq/spec/train_eagle.py): varied chat prompts (GSM8K, coding requests, WikiText-2 valid
# paragraphs / topics in summary, translation, QA, extraction, writing, role-play templates); the target
# answers greedily (256 tokens, packed batches) and the same forwards give the features; the head trains on
# them with 2 unrolled steps on its own predicted features (the tree's depths 2-3), feature noise 0.05.
# SELF (default 0.3): share of prompts the target writes itself (specq train-eagle --self-instruct).
# Time boxes: generation stops after GEN_S seconds, training after TRAIN_S (the cosine schedule is fitted to
# the epochs that fit), so load + generate + train + save stays under ~500 s.
set -euo pipefail
MODEL=${MODEL:-/root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-out}
GEN_S=${GEN_S:-220}
TRAIN_S=${TRAIN_S:-220}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/eagle_smollm2"
python3 -m specq.spec.train_eagle --model "$MODEL" --out "$OUT/eagle_smollm2" --device cuda \
  --num-prompts 4096 --self-instruct ${SELF:-0.3} --max-new-tokens 256 --gen-batch 128 --gen-budget-s "$GEN_S" \
  --epochs ${EPOCHS:-40} --lr ${LR:-5e-4} --batch-tokens 8192 --noise 0.05 --unroll ${UNROLL:-2} \
  --train-budget-s "$TRAIN_S" --features /tmp/specq_eagle_smollm2_feats_v3.safetensors \
  --log "$OUT/eagle_smollm2/train_log.txt" 2>&1 | tee "$OUT/eagle_smollm2/console.txt"
ls -la "$OUT/eagle_smollm2"
