"""Join `specq bench spec` JSONs (e.g. bench/spec_full_a.sh + _b.sh) into one JSON + markdown + bar chart.

    python3 bench/spec_merge.py out/spec_smollm2_a.json out/spec_smollm2_b.json --out bench/results/spec_smollm2.json

Each row keeps its own run's plain-decoding baseline (speedup is measured within a run); rows get a
"run" field (the input's file stem). --table prints the overall rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def overall_table(rows) -> str:
    lines = ["| method | verify | T | tau | tok/s | speedup | greedy mismatches | run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["category"] == "overall":
            gm = r.get("greedy_mismatches")
            lines.append(f"| {r['method']} | {r['verify']} | {r['temperature']} | {r['tau']:.2f} | {r['tok_s']:.1f} | "
                         f"{r['speedup']:.2f}x | {'-' if gm is None else gm} | {r.get('run', '')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    from specq.bench.spec import markdown, plot
    rows, runs = [], []
    for f in a.inputs:
        p = Path(f)
        if not p.is_file():
            print(f"spec_merge: {f} missing, skipped", file=sys.stderr)
            continue
        r = json.loads(p.read_text())
        for x in r["rows"]:
            x.setdefault("run", p.stem)
            rows.append(x)
        runs.append({k: v for k, v in r.items() if k != "rows"} | {"file": p.name})
    if not rows:
        print("spec_merge: no rows", file=sys.stderr)
        return 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = runs[0].get("device")
    res = {"rows": rows, "runs": runs, "device": dev, "complete": all(r.get("complete", True) for r in runs),
           "note": "speedup = tok/s over plain decoding measured in the same run (the row's 'run'); tau = tokens "
                   "per target forward, bonus included; first turn, chat template"}
    out.write_text(json.dumps(res, indent=2))
    md = "## overall\n\n" + overall_table(rows) + "\n\n## per category\n\n" + markdown(rows) + "\n"
    out.with_suffix(".md").write_text(md)
    try:
        plot(rows, out.with_suffix(".png"))
    except Exception as e:  # no matplotlib: JSON and markdown are enough
        print(f"spec_merge: no plot ({type(e).__name__}: {e})", file=sys.stderr)
    if a.table:
        print(overall_table(rows))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
