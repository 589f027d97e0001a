#!/usr/bin/env bash
# Build bench/_old/specq = this checkout's specq with the speculative engine files of an older commit
# (default 6771b56, before the CUDA-graph engine), for bench/spec_step_time.sh's before/after timing.
# Run on the CPU machine (needs git); bench/_old then travels with the working tree. Delete it afterwards.
set -euo pipefail
C=${1:-6771b56}
rm -rf bench/_old && mkdir -p bench/_old
cp -r specq bench/_old/ && rm -rf bench/_old/specq/assets && find bench/_old -name __pycache__ -prune -exec rm -rf {} +
rm -f bench/_old/specq/spec/graphs.py
for f in specq/engine.py specq/spec/{base,verify,eagle,tree,draft_model,ngram,multi,hier,factory,metrics}.py; do
  git show "$C:$f" > "bench/_old/$f"
done
echo "bench/_old: specq with the engine of $C"
