#!/usr/bin/env bash
# Speculative engine speed before/after on the GPU machine (random-weight SmolLM2-shaped models), repo root
# as cwd. "old" = the previous engine (bench/_old, made by bench/spec_make_old.sh on the CPU machine: this
# checkout with the engine files of the commit before the CUDA-graph engine); "new" = this checkout.
# Writes $OUT/step_{new,old}.json and prints a table last (~130 s on an H100).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
timeout 90 python3 bench/spec_step_time.py --tag new --reps 2 --out "$OUT/step_new.json" 2>&1 | tail -25
if [ -d bench/_old/specq ]; then
  PYTHONPATH=$PWD/bench/_old timeout 90 python3 bench/spec_step_time.py --tag old --reps 1 --out "$OUT/step_old.json" 2>&1 | tail -12
fi
python3 - "$OUT" <<'PY'
import json, sys, glob, os
rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "step_*.json"))):
    r = json.load(open(f))
    for x in r["rows"]:
        key = x["method"] + ("@%s" % x["temperature"] if x.get("temperature") else "")
        rows.setdefault(key, {})[r["tag"]] = x
tags = ["old", "new"]
print("\n%-18s" % "method" + "".join("%26s" % t for t in tags) + "   new/old")
for k, v in rows.items():
    cells = []
    for t in tags:
        x = v.get(t)
        cells.append("%26s" % ("-" if x is None else x.get("error", "")[:24] if "error" in x else
                     "%7.1f tok/s %6.2f ms" % (x["tok_s"], x.get("ms_per_step", 0))))
    ratio = (v["new"]["tok_s"] / v["old"]["tok_s"]) if "old" in v and "new" in v and "tok_s" in v["old"] and "tok_s" in v["new"] else float("nan")
    print("%-18s" % k + "".join(cells) + "   %5.2fx" % ratio)
PY
