#!/usr/bin/env bash
# Spec-Bench on the GPU machine, part A of 2 (repo root as cwd; <= 540 s): first turn, chat template,
# 10 questions per category (130), 128 new tokens, SmolLM2-135M-Instruct bf16, real weights.
#   T=0:   plain, eagle, ngram, hier, draft          T=0.7: plain, eagle
# Part B (bench/spec_full_b.sh) runs multi rrs / rrs-wo / spechub at T=0.7; bench/spec_merge.py joins them.
#   MODEL=/root/models/SmolLM2-135M-Instruct.Q4_1.gguf SPECQ_DATA=/path/to/data OUT=out bash bench/spec_full_a.sh
# HEAD: EAGLE head folder (default: the bundled one; use $OUT/eagle_smollm2 after bench/train_eagle_gpu.sh).
# METHODS / TEMPS / NAME override the method list, temperatures and output name (split runs).
# Rows are saved after every method, so a time limit keeps what finished ("complete": false).
set -u
MODEL=${MODEL:-/root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
HEAD=${HEAD:-specq/assets/eagle_smollm2}
OUT=${OUT:-out}
PER_CATEGORY=${PER_CATEGORY:-10}
: "${SPECQ_DATA:?set SPECQ_DATA to the data folder (spec_bench.jsonl)}"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SPECQ_DATA
mkdir -p "$OUT"
timeout -s INT "${LIMIT_S:-520}" python3 -m specq.cli bench spec --model "$MODEL" --device cuda --eagle-head "$HEAD" \
  --per-category "$PER_CATEGORY" --max-new-tokens 128 --temperatures "${TEMPS:-0,0.7}" \
  --methods "${METHODS:-eagle,ngram@0,hier@0,draft@0}" --out "$OUT/${NAME:-spec_smollm2_a}.json" --no-progress 2>&1 \
  | grep -v '^|' | tail -30
python3 bench/spec_merge.py "$OUT/${NAME:-spec_smollm2_a}.json" --out "$OUT/${NAME:-spec_smollm2_a}.json" --table
