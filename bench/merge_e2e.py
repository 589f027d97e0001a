"""Merge several bench/e2e.py runs (each its own e2e.json, e.g. one GPU call per model because compiling takes
minutes) into one e2e.json + plots: rows (the copied SmolLM2 rows once), latency, planner, errors, with every
run's command, date and device kept under "runs".
    python bench/merge_e2e.py OUT_DIR RUN1/e2e.json RUN2/e2e.json ..."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_run(p: Path) -> dict:
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"merge_e2e: cannot read {p}: {e}") from None
    missing = [k for k in ("rows", "latency", "planner", "errors", "command", "date", "device") if k not in r]
    if missing:
        raise SystemExit(f"merge_e2e: {p} is not a bench/e2e.py result (no {', '.join(missing)})")
    return r


def merge(paths: list[Path]) -> dict:
    runs = [read_run(p) for p in paths]
    out = {k: v for k, v in runs[0].items() if k not in ("rows", "latency", "planner", "errors", "elapsed_s")}
    out.update(rows=[], latency=[], planner=[], errors=[])
    out["runs"] = [{"command": r["command"], "date": r["date"], "device": r["device"], "torch": r.get("torch"),
                    "side": r.get("side"), "errors": r["errors"], "elapsed_s": r.get("elapsed_s")} for r in runs]
    out["command"] = " ; ".join(r["command"] for r in runs)
    out["date"] = max(r["date"] for r in runs)
    seen = set()
    for r in runs:
        for row in r["rows"]:
            key = (row["model"], row["format"], row.get("structure", row["method"]), row["acceptance"])
            if row["acceptance"] == "real" or row["model"] == "smollm2":
                if key in seen:
                    continue
            elif key in seen:
                raise SystemExit(f"row {key} appears in two runs")
            seen.add(key)
            out["rows"].append(row)
        out["latency"] += r["latency"]
        out["planner"] += r["planner"]
        out["errors"] += r["errors"]
    have = {f"{row['model']} {row['format']}:" for row in out["rows"]}
    # an error of one run whose model/format another run then measured stays only under runs[i].errors
    out["errors"] = [e for e in out["errors"] if not any(e.startswith(h) for h in have)]
    return out


def main():
    if len(sys.argv) < 3:
        raise SystemExit("usage: python bench/merge_e2e.py OUT_DIR RUN1/e2e.json [RUN2/e2e.json ...]")
    out = Path(sys.argv[1])
    res = merge([Path(p) for p in sys.argv[2:]])
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(res, indent=1))
    from specq.bench.e2e import table
    from specq.bench.e2e_plot import plot
    plot(res, out)
    print(table(res))


if __name__ == "__main__":
    main()
