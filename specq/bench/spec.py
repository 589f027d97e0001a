"""`specq bench spec`: speculative methods over Spec-Bench / MT-bench, per category, vs plain decoding.

Per (method, verify, temperature) and category: tau (tokens per target forward, bonus included), tok/s
and speedup over plain decoding of the same model and format, measured in the same run. Writes JSON,
a markdown table and a bar chart of speedup per category and method.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import SpecqError

DEFAULT_METHODS = "ngram,eagle,draft,hier"


def parse_methods(s: str) -> list[tuple[str, str, tuple | None]]:
    """"ngram@0,eagle,multi:rrs@0.7" -> [("ngram", "auto", (0.0,)), ("eagle", "auto", None), ("multi", "rrs", (0.7,))].
    method[:verify][@T1/T2...]: without @ a method runs at every --temperatures value, with @ only at those."""
    out = []
    for item in s.split(","):
        item = item.strip()
        if not item:
            continue
        item, _, ts = item.partition("@")
        m, _, v = item.partition(":")
        if m not in ("none", "ngram", "eagle", "draft", "multi", "hier"):
            raise SpecqError(f"unknown method {m!r} in --methods (none, ngram, eagle, draft, multi[:verify], hier; "
                             "optionally @T1/T2 for its temperatures)")
        try:
            temps = tuple(float(t) for t in ts.split("/")) if ts else None
        except ValueError:
            raise SpecqError(f"bad temperatures {ts!r} in --methods item {item!r}") from None
        out.append((m, v or "auto", temps))
    if not out:
        raise SpecqError("--methods is empty")
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_plain(llm, prompts, max_new, sp, seed, decoder=None):
    """Plain decoding (CUDA-graph step on GPU): per prompt (tokens, seconds). A shared decoder keeps its
    graph across prompts (steady-state speed, as the speculative engine keeps its graphs)."""
    from ..generate import generate
    res = []
    for ids in prompts:
        sync(); t0 = time.perf_counter()
        out = generate(llm.model, ids, max_new, sp, eos_ids=llm.tok.eos_ids, seed=seed, decoder=decoder)
        sync(); res.append((out, time.perf_counter() - t0))
    return res


def run_spec(llm, factory, prompts, max_new, sp, seed, compile=False):
    from ..engine import SpecEngine, compile_steps
    res = []
    for ids in prompts:
        prop, vm = factory(sp)
        if compile:     # compiled verification / drafting steps (runners and graphs kept across prompts)
            compile_steps(llm.model, prop)
        eng = SpecEngine(llm.model, prop, sp, vm, seed=seed)
        sync(); t0 = time.perf_counter()
        out, m = eng.generate(ids, max_new, eos_ids=llm.tok.eos_ids)
        sync(); res.append((out, time.perf_counter() - t0, m))
    return res


@torch.no_grad()
def divergence(llm, ids, ref, out):
    """Where a T=0 speculative output `out` first leaves plain decoding's `ref`: the plain model's top-2 logit
    gap at that position (from one forward over prompt + ref prefix) and the rank of out's token there
    (1 = runner-up). None when the outputs agree, one is a prefix of the other, or the cache is too small.
    A lossless engine can only part from plain decoding at a near-tie of the plain model's logits."""
    from ..models.llama import causal_mask
    j = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), None)
    M = llm.model
    n = len(ids) + (j or 0)
    if j is None or M.cache_size < n:
        return None
    dev = M.device
    pos = torch.arange(n, device=dev)
    lg = M(torch.tensor(list(ids) + list(ref[:j]), device=dev), pos, pos, causal_mask(0, n, M.cache_size, dev),
           return_hidden=False, logits_rows=slice(n - 1, n))[0].float()
    top = lg.topk(2).values
    return {"position": j, "top2_gap": float(top[0] - top[1]), "rank": int((lg > lg[out[j]]).sum())}


def bench(llm, methods, temperatures, bench_name="spec_bench", per_category=10, max_new=128, seed=0,
          spec_kw=None, progress=True, warmup=1, on_rows=None, compile=False):
    """Rows per (method, verify, temperature, category). Each method first decodes the longest and the shortest
    prompt (untimed: CUDA graphs are captured, caches sized for every question, compiled layers made dynamic). on_rows(rows) is called
    after every method (partial results survive a time limit)."""
    from ..data import bench_questions
    from ..sampling import SamplingParams
    from ..spec.factory import make_proposer_factory
    qs = bench_questions(bench_name, per_category)
    cats = [q.get("category", "all") for q in qs]
    prompts = [llm.tok.chat([{"role": "user", "content": q["turns"][0]}]) for q in qs]
    # warm-up prompts: the longest (sizes the caches) and the shortest: with --compile-blocks the layers are compiled
    # with automatic dynamic shapes, and a second prompt length is what makes them dynamic (a recompile that would
    # otherwise land inside a timed run)
    longest = [max(prompts, key=len)] + ([min(prompts, key=len)] if len({len(p) for p in prompts}) > 1 else [])
    methods = [tuple(x) + (None,) * (3 - len(x)) for x in methods]         # (method, verify[, temperatures])
    temperatures = list(temperatures) + sorted({t for *_, ts in methods if ts for t in ts} - set(temperatures))
    rows, greedy_ref = [], None
    n_runs = sum(1 + sum(1 for m, v, ts in methods if m != "none" and (ts is None or T in ts)) for T in temperatures)
    bar = tqdm(total=n_runs * len(prompts), desc="bench spec", disable=not progress, file=sys.stderr)
    t_start = time.time()
    for T in temperatures:
        sp = SamplingParams(T)
        from ..generate import Decoder
        dec = Decoder(llm.model, len(longest[0]) + max_new, compile=compile)   # one decoder, one graph, every prompt
        run_plain(llm, longest, max_new, sp, seed, dec)                     # warm-up: graph capture, allocator
        base = run_plain(llm, prompts, max_new, sp, seed, dec); bar.update(len(prompts))
        base_tps = {c: [0, 0.0] for c in set(cats) | {"overall"}}
        for c, (out, dt) in zip(cats, base):
            for k in (c, "overall"):
                base_tps[k][0] += len(out); base_tps[k][1] += dt
        for k, (n, dt) in sorted(base_tps.items()):
            rows.append(dict(method="none", verify="-", temperature=T, category=k, tau=1.0, tok_s=n / dt,
                             speedup=1.0, tokens=n))
        print(f"bench spec: plain T={T}: {base_tps['overall'][0] / base_tps['overall'][1]:.1f} tok/s "
              f"({time.time() - t_start:.0f}s)", file=sys.stderr, flush=True)
        if T == 0:
            greedy_ref = [o for o, _ in base]
        for m, v, ts in methods:
            if m == "none" or (ts is not None and T not in ts):
                continue
            if T > 0 and v == "greedy":
                continue
            factory = make_proposer_factory(llm, m, verify=v, **(spec_kw or {}))
            run_spec(llm, factory, longest, max_new, sp, seed, compile)          # warm-up: graphs, cache sizes
            res = run_spec(llm, factory, prompts, max_new, sp, seed, compile); bar.update(len(prompts))
            agg = defaultdict(lambda: [0, 0.0, 0, 0])  # tokens, seconds, steps, emitted
            mismatch, gaps = 0, []
            for i, (c, (out, dt, met)) in enumerate(zip(cats, res)):
                if T == 0 and greedy_ref is not None and out != greedy_ref[i]:
                    mismatch += 1
                    d = divergence(llm, prompts[i], greedy_ref[i], out)
                    if d is not None:
                        gaps.append(d)
                for k in (c, "overall"):
                    a = agg[k]; a[0] += len(out); a[1] += dt; a[2] += met.steps; a[3] += met.emitted
            for k, (n, dt, steps, emitted) in sorted(agg.items()):
                tps = n / dt
                base_k = base_tps[k][0] / base_tps[k][1]
                row = dict(method=m, verify=v, temperature=T, category=k, tau=emitted / max(steps, 1), tok_s=tps,
                           speedup=tps / base_k, tokens=n)
                if T == 0:
                    row["greedy_mismatches"] = mismatch if k == "overall" else None
                    if k == "overall" and gaps:   # plain model's logits where each mismatch begins
                        row["mismatch_top2_gap_max"] = max(g["top2_gap"] for g in gaps)
                        row["mismatch_top2_gap_median"] = sorted(g["top2_gap"] for g in gaps)[len(gaps) // 2]
                        row["mismatch_token_rank_max"] = max(g["rank"] for g in gaps)
                rows.append(row)
            o = agg["overall"]
            print(f"bench spec: {m}:{v} T={T}: tau {o[3] / max(o[2], 1):.2f}, {o[0] / o[1]:.1f} tok/s "
                  f"({time.time() - t_start:.0f}s)", file=sys.stderr, flush=True)
            if on_rows is not None:
                on_rows(rows)
    bar.close()
    return rows


def markdown(rows) -> str:
    lines = ["| method | verify | T | category | tau | tok/s | speedup |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['verify']} | {r['temperature']} | {r['category']} | {r['tau']:.2f} | "
                     f"{r['tok_s']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["method"], r["verify"], r["temperature"]) for r in rows if r["method"] != "none"})
    cats = sorted({r["category"] for r in rows} - {"overall"}) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(8, len(cats) * 1.6), 4.5))
    w = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        vals = [next((r["speedup"] for r in rows if (r["method"], r["verify"], r["temperature"]) == key
                      and r["category"] == c), 0) for c in cats]
        ax.bar([j + i * w for j in range(len(cats))], vals, w, label=f"{key[0]}/{key[1]} T={key[2]}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cats))], cats, rotation=20)
    ax.set_ylabel("speedup over plain decoding")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(a) -> int:
    from ..api import LLM
    methods = parse_methods(a.methods)
    temps = [float(t) for t in a.temperatures.split(",")]
    from ..cli import compile_flag, quant_from_args
    quant = quant_from_args(a)
    try:   # checked before the model loads
        top_k, depth, total = (int(v) for v in a.tree.split(":"))
        if min(top_k, depth, total) < 1:
            raise ValueError
    except ValueError:
        raise SpecqError(f"invalid --tree {a.tree!r}: expected top_k:depth:total_tokens, integers >= 1, "
                         "e.g. 16:5:80") from None
    compile = compile_flag(a)
    llm = LLM(a.model, device=a.device, dtype=a.dtype, quant=quant)
    spec_kw = dict(k=a.draft_len, n_drafts=a.n_drafts, eagle_head=a.eagle_head, draft_model=a.draft_model,
                   intermediate=a.intermediate, top_k=top_k, depth=depth, total_tokens=total)
    dev = torch.cuda.get_device_name() if llm.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    res = {"rows": [], "model": a.model, "format": a.format, "bench": a.bench, "per_category": a.per_category,
           "max_new_tokens": a.max_new_tokens, "eagle_tree": a.tree, "command": "specq " + " ".join(sys.argv[1:]), "device": dev,
           "torch": torch.__version__, "date": datetime.date.today().isoformat(), "compile": "blocks" if getattr(a, "compile_blocks", False) else a.compile,
           "note": "speedup = tok/s over plain decoding (specq, CUDA-graph step on GPU) of the same model and format "
                   "in the same run; tau = tokens emitted per target forward, bonus included"}
    if quant and quant.get("lm_head"):
        res["lm_head"] = "quantized"

    def save(rows, final=False):
        for r in rows:
            r["device"] = dev
            r["format"] = a.format
        res["rows"] = rows
        res["complete"] = final
        if a.out:
            out = Path(a.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
            out.with_suffix(".md").write_text(markdown(rows) + "\n")

    rows = bench(llm, methods, temps, a.bench, a.per_category, a.max_new_tokens, a.seed, spec_kw, not a.no_progress,
                 on_rows=save, compile=compile)
    save(rows, final=True)
    print(markdown(rows))
    if a.out:
        out = Path(a.out)
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)
    return 0
