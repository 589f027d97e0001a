"""EAGLE tau at T=0 without re-running the target: a fast replay for choosing tree settings and heads (CPU).

At temperature 0 the output is the target's greedy continuation G whatever the drafts are, so each
verification step's accepted length depends only on the tree the head grows at position L and on G.
This script decodes G once per question (cached), takes the target's features of prompt+G from one
forward, then replays the speculative loop: the proposer grows its tree at L, the accepted path is the
longest root path spelling G[L+1..], the head commits the accepted tokens with their true features.
Exactly the engine's loop minus the target forwards (features come from one full forward instead of
the tree forwards: equal up to float rounding). Spec-Bench, first turn, chat template.

    python bench/spec_tau_sim.py --per-category 2 --settings 10:6:60,10:8:80 --heads specq/assets/eagle_smollm2
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
from specq.data import bench_questions  # noqa: E402
from specq.models import load_model  # noqa: E402
from specq.models.llama import causal_mask  # noqa: E402
from specq.spec.eagle import EagleProposer, load_head  # noqa: E402
from specq.spec.factory import BUNDLED_EAGLE  # noqa: E402


def pick(per_category: int, skip: int) -> list[dict]:
    qs = bench_questions("spec_bench", per_category + skip)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for q in qs:
        seen[q["category"]] += 1
        if seen[q["category"]] > skip:
            out.append(q)
    return out


@torch.no_grad()
def greedy_runs(model, tok, qs, max_new, cache_file):
    """[(prompt ids, greedy continuation)] per question, cached by question id."""
    from specq.engine import SpecEngine
    cache = json.loads(Path(cache_file).read_text()) if cache_file and Path(cache_file).is_file() else {}
    out = []
    for q in qs:
        key = f"{q['question_id']}:{max_new}"
        ids = tok.chat([{"role": "user", "content": q["turns"][0]}])
        if key not in cache:
            cache[key] = SpecEngine(model, None).generate(ids, max_new, eos_ids=tok.eos_ids)[0]
            if cache_file:
                Path(cache_file).write_text(json.dumps(cache))
        out.append((ids, cache[key]))
    return out


@torch.no_grad()
def features(model, ids, gen):
    seq = torch.tensor(ids + gen)
    n = seq.shape[0]
    model.setup_cache(n)
    pos = torch.arange(n)
    return seq, model(seq, pos, pos, causal_mask(0, n, n), logits_rows=slice(0, 0))[1]


@torch.no_grad()
def replay(prop, seq, hid, P):
    """-> (steps, emitted, depth_hits): the engine's greedy loop on a known continuation seq[P:]."""
    n = seq.shape[0]
    prop.setup(n + 8)
    prop.prefill(seq[:P], hid[:P], int(seq[P]))
    L, steps, emitted, hits = P, 0, 0, defaultdict(int)
    while L < n - 1:                       # root = seq[L]; the target's continuation is seq[L+1:]
        d = prop.propose(int(seq[L]))
        tok, par = d.tokens.tolist(), d.parents.tolist()
        kids = defaultdict(list)
        for i in range(1, len(par)):
            kids[par[i]].append(i)
        node, a = 0, 0
        while L + a + 1 < n:
            nxt = next((c for c in kids[node] if tok[c] == int(seq[L + a + 1])), None)
            if nxt is None:
                break
            node, a = nxt, a + 1
        for dd in range(1, a + 1):
            hits[dd] += 1
        steps += 1
        emitted += a + 1
        acc = seq[L:L + a + 1]
        if L + a + 1 < n:
            prop.commit(acc, hid[L:L + a + 1], int(seq[L + a + 1]))
        L += a + 1
    return steps, emitted, hits


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--heads", default=str(BUNDLED_EAGLE["smollm2"]), help="comma list of head folders")
    ap.add_argument("--settings", default="10:6:60", help="comma list of top_k:depth:total_tokens")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--cache", default="/tmp/specq_tau_sim_greedy.json", help="greedy continuations cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    qs = pick(a.per_category, a.skip)
    t0 = time.time()
    runs = greedy_runs(model, tok, qs, a.max_new_tokens, a.cache)
    print(f"{len(runs)} greedy continuations ({time.time() - t0:.0f}s)", flush=True)
    feats = [features(model, ids, gen) for ids, gen in runs]
    import datetime
    import platform
    res = {"questions": [q["question_id"] for q in qs], "results": [],
           "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__} (float32)",
           "note": "T=0 replay of the engine's loop on each question's greedy continuation (no GPU); tau bonus included"}
    for hp in a.heads.split(","):
        head = load_head(hp, model)
        for s in a.settings.split(","):
            k, d, n = (int(x) for x in s.split(":"))
            t0 = time.time()
            per = defaultdict(lambda: [0, 0])
            hits = defaultdict(int)
            for q, (ids, _), (seq, hid) in zip(qs, runs, feats):
                st, em, h = replay(EagleProposer(head, model, top_k=k, depth=d, total_tokens=n), seq, hid, len(ids))
                for c in (q["category"], "overall"):
                    per[c][0] += st
                    per[c][1] += em
                for dd, v in h.items():
                    hits[dd] += v
            tau = {c: round(e / max(st, 1), 3) for c, (st, e) in sorted(per.items())}
            acc = [round(hits[i] / per["overall"][0], 3) for i in range(1, max(hits, default=0) + 1)]
            res["results"].append({"head": hp, "setting": s, "tau": tau, "acceptance": acc})
            print(f"{Path(hp).name} {s}: tau {tau['overall']:.3f} | acc/depth {acc[:8]} | {time.time() - t0:.0f}s", flush=True)
            print("   " + " ".join(f"{c}={v:.2f}" for c, v in tau.items() if c != "overall"), flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
