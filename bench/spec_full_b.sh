#!/usr/bin/env bash
# Spec-Bench on the GPU machine, part B of 2 (repo root as cwd; <= 540 s): multi-draft verification at
# T=0.7 with the default draft (a 4-bit RTN copy of the target), k=5 (63-node binary tree):
#   T=0.7: plain, multi:spechub, multi:rrs-wo, multi:rrs
#   MODEL=/root/models/SmolLM2-135M-Instruct.Q4_1.gguf SPECQ_DATA=/path/to/data OUT=out bash bench/spec_full_b.sh
# then: python3 bench/spec_merge.py $OUT/spec_smollm2_a.json $OUT/spec_smollm2_b.json --out $OUT/spec_smollm2.json
set -u
MODEL=${MODEL:-/root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-out}
PER_CATEGORY=${PER_CATEGORY:-10}
: "${SPECQ_DATA:?set SPECQ_DATA to the data folder (spec_bench.jsonl)}"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SPECQ_DATA
mkdir -p "$OUT"
timeout -s INT "${LIMIT_S:-520}" python3 -m specq.cli bench spec --model "$MODEL" --device cuda \
  --per-category "$PER_CATEGORY" --max-new-tokens 128 --temperatures 0.7 \
  --methods "multi:spechub,multi:rrs-wo,multi:rrs" --out "$OUT/spec_smollm2_b.json" --no-progress 2>&1 \
  | grep -v '^|' | tail -30
if [ -f "$OUT/spec_smollm2_a.json" ]; then
  python3 bench/spec_merge.py "$OUT/spec_smollm2_a.json" "$OUT/spec_smollm2_b.json" --out "$OUT/spec_smollm2.json" --table
else
  python3 bench/spec_merge.py "$OUT/spec_smollm2_b.json" --out "$OUT/spec_smollm2_b.json" --table
fi
