#!/bin/bash
# Programmatic dependent launch (SPECQ_PDL=1) on the GPU machine: correctness, then a same-machine decode-step A/B.
#   bash bench/dev/pdl_ab.sh [repeats]      (writes $OUT/tok_*.txt: the greedy tokens of every run)
set -e
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/pdl_ab}; mkdir -p $OUT
ts() { python3 -u -c "import sys,time;[print(time.strftime('%H:%M:%S'),l,end='',flush=True) for l in sys.stdin]"; }
SPECQ_PDL=1 python3 bench/dev/pdl_check.py 2>&1 | ts
SPECQ_PDL=1 python3 bench/check_kernels.py --quick 2>&1 | tail -4 | ts
for i in $(seq 1 ${1:-2}); do
  for v in 0 1; do
    echo "SPECQ_PDL=$v run $i" | ts
    SPECQ_PDL=$v python3 bench/dev/decode_profile.py --compile --regional --quant-head --no-table \
      --tokens $OUT/tok_${v}_$i.txt 2>&1 | grep "tok/s" | ts
  done
done
for f in $OUT/tok_*.txt; do cmp -s $f $OUT/tok_0_1.txt && echo "$f: same tokens as tok_0_1" || echo "$f: DIFFERENT tokens"; done
