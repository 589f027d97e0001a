#!/bin/bash
# Programmatic dependent launch on the GPU machine: correctness, then same-machine A/Bs of the variants.
#   VARIANTS="0 1" bash bench/dev/pdl_ab.sh [repeats]
# A variant is a SPECQ_PDL value. Per variant: bench/dev/pdl_check.py (PDL on), bench/dev/fused_ab.py 1
# (one 8B layer's four fused w4mma, graph replays) and decode_profile (8B W4A16 decode step, synchronous loop,
# greedy tokens written to $OUT/tok_<variant>_<i>.txt and compared). CHECK=1: check_kernels --quick per PDL variant.
set -e
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/pdl_ab}; mkdir -p $OUT
ts() { python3 -u -c "import sys,time;[print(time.strftime('%H:%M:%S'),l,end='',flush=True) for l in sys.stdin]"; }
VARIANTS=${VARIANTS:-"0 1"}
for v in $VARIANTS; do
  export SPECQ_PDL=$v
  [ "$SPECQ_PDL" = 1 ] && python3 bench/dev/pdl_check.py 2>&1 | sed "s/^/[$v] /" | ts
  [ "$SPECQ_PDL" = 1 ] && [ "${CHECK:-0}" = 1 ] && python3 bench/check_kernels.py --quick 2>&1 | tail -2 | sed "s/^/[$v] /" | ts
  python3 bench/dev/fused_ab.py 1 2>&1 | tail -${FUSED_LINES:-3} | sed "s/^/[$v] fused_ab: /" | ts
done
for i in $(seq 1 ${1:-2}); do
  for v in $VARIANTS; do
    export SPECQ_PDL=$v
    python3 bench/dev/decode_profile.py --compile --regional --quant-head --no-table --tokens $OUT/tok_${v}_$i.txt \
      2>&1 | grep "tok/s" | sed "s/^/[$v] /" | ts
  done
done
first=$(ls $OUT/tok_*.txt | head -1)
for f in $OUT/tok_*.txt; do cmp -s $f $first && echo "$f: same tokens as $first" || echo "$f: DIFFERENT tokens"; done
