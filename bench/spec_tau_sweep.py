"""EAGLE tree settings vs tau on Spec-Bench (first turn, chat template, T=0), CPU, real SmolLM2 + a head.

    python bench/spec_tau_sweep.py --per-category 2 --settings 10:6:60,10:8:80 --out bench/results/cpu/eagle_tau_sweep.json

Prints, per setting "top_k:depth:total_tokens", tau overall and per category and the acceptance per
depth (fraction of steps whose accepted path reached depth d). Questions: the first `skip`+1 ..
`skip`+per_category of each category (skip lets a second run use other questions).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specq.engine import SpecEngine  # noqa: E402
from specq.models import load_model  # noqa: E402
from specq.sampling import SamplingParams  # noqa: E402
from specq.spec.eagle import EagleProposer, load_head  # noqa: E402
from specq.spec.factory import BUNDLED_EAGLE  # noqa: E402
from specq.spec.metrics import Metrics  # noqa: E402
from spec_tau_sim import pick  # noqa: E402  (same folder: the same question choice)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--head", default=str(BUNDLED_EAGLE["smollm2"]))
    ap.add_argument("--settings", default="10:6:60")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    head = load_head(a.head, model)
    qs = pick(a.per_category, a.skip)
    prompts = [tok.chat([{"role": "user", "content": q["turns"][0]}]) for q in qs]
    res = {"model": a.model, "head": a.head, "questions": [q["question_id"] for q in qs], "settings": {}}
    for s in a.settings.split(","):
        k, d, n = (int(x) for x in s.split(":"))
        per = defaultdict(Metrics)
        t0 = time.time()
        for q, ids in zip(qs, prompts):
            eng = SpecEngine(model, EagleProposer(head, model, top_k=k, depth=d, total_tokens=n), SamplingParams())
            _, m = eng.generate(ids, a.max_new_tokens, eos_ids=tok.eos_ids)
            per[q["category"]] = per[q["category"]] + m
            per["overall"] = per["overall"] + m
        row = {c: round(m.tau, 3) for c, m in sorted(per.items())}
        acc = [round(x, 3) for x in per["overall"].acceptance]
        res["settings"][s] = {"tau": row, "acceptance": acc, "seconds": round(time.time() - t0, 1)}
        print(f"{s}: tau {row['overall']:.3f} | acc/depth {acc} | {time.time() - t0:.0f}s", flush=True)
        print("   " + " ".join(f"{c}={v:.2f}" for c, v in row.items() if c != "overall"), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
