#!/usr/bin/env bash
# EAGLE-2 tree size vs tau and speed on the GPU machine (repo root as cwd; one run, <= 540 s): Spec-Bench first
# turn, 10 questions per category, 128 new tokens, T=0, the bundled head, trees 16:5:80 (default), 32:5:80,
# 32:6:128, 48:8:256 (each invocation measures its own plain baseline). GPU result (2026-11-26, trees 16:5:80,
# 32:6:128, 48:8:256): bench/results/h100/spec_eagle_trees.json, tau 2.31 / 2.45 / 2.61.
#   MODEL=/root/models/SmolLM2-135M-Instruct.Q4_1.gguf SPECQ_DATA=/root/data OUT=out bash bench/spec_eagle_trees.sh
# then: python3 bench/spec_merge.py $OUT/spec_tree_*.json --out bench/results/h100/spec_eagle_trees.json --table
set -u
MODEL=${MODEL:-/root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-out}
: "${SPECQ_DATA:?set SPECQ_DATA to the data folder (spec_bench.jsonl)}"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SPECQ_DATA
mkdir -p "$OUT"
for T in ${TREES:-16:5:80 32:5:80 32:6:128 48:8:256}; do
  timeout -s INT "${LIMIT_S:-130}" python3 -m specq.cli bench spec --model "$MODEL" --device cuda --per-category 10 \
    --max-new-tokens 128 --temperatures 0 --methods eagle --tree "$T" --out "$OUT/spec_tree_${T//:/_}.json" \
    --no-progress 2>&1 | grep "bench spec"
done
python3 bench/spec_merge.py "$OUT"/spec_tree_*.json --out "$OUT/spec_eagle_trees.json" --table
