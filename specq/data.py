"""Evaluation and training data from ../shared/data: GSM8K train (parquet), Spec-Bench / MT-bench (jsonl).

GSM8K is parquet; machines without pyarrow (the GPU box) can use a gsm8k_train.jsonl written beside it
by `python -m specq.data export DIR` (same rows, one {"question", "answer"} object per line)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import SpecqError
from .paths import data_dir, data_file


def gsm8k_records() -> list[dict]:
    d = data_dir()
    js = d / "gsm8k_train.jsonl"
    try:
        import pyarrow.parquet as pq
        t = pq.read_table(str(data_file("gsm8k_train.parquet")), columns=["question", "answer"]).to_pydict()
        return [{"question": q, "answer": a} for q, a in zip(t["question"], t["answer"])]
    except ImportError:
        if js.is_file():
            return [json.loads(l) for l in js.read_text(encoding="utf-8").splitlines() if l.strip()]
        raise SpecqError("reading GSM8K needs pyarrow (pip install pyarrow) or gsm8k_train.jsonl in the data folder") from None


def gsm8k_questions() -> list[str]:
    return [r["question"] for r in gsm8k_records()]


def bench_questions(name: str = "spec_bench", per_category: int | None = None) -> list[dict]:
    """Spec-Bench or MT-bench rows {question_id, category, turns}; first per_category of each category."""
    fname = {"spec_bench": "spec_bench.jsonl", "mt_bench": "mt_bench.jsonl"}.get(name)
    if fname is None:
        raise SpecqError(f"unknown benchmark {name!r} (spec_bench, mt_bench)")
    rows = [json.loads(l) for l in data_file(fname).read_text(encoding="utf-8").splitlines() if l.strip()]
    if per_category is None:
        return rows
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        c = r.get("category", "all")
        if seen.get(c, 0) < per_category:
            out.append(r)
            seen[c] = seen.get(c, 0) + 1
    return out


def export(dest: str) -> None:
    """Copy the data folder to dest, adding gsm8k_train.jsonl (for machines without pyarrow)."""
    import shutil
    d, out = data_dir(), Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    (out / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records()), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "export":
        sys.exit("usage: python -m specq.data export DIR")
    export(sys.argv[2])
