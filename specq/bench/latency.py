"""`specq bench latency`: target forward time T(M) vs number of new tokens M, per format, and the
verification-cost curve T(M)/T(1) that decides how large a draft pays. Also the draft planner.

Planner (used by `specq bench latency --acceptance ...`): for a chain of k drafted tokens with per-depth
conditional acceptance a[d] (P(depth d accepted | depth d-1 accepted)), the expected tokens per target
forward are E(k) = 1 + sum_{d<=k} prod_{i<=d} a[i]; the time per step is T(k+1) + k * t_draft; the best k
maximises E(k) / time. Trees enter as candidates with a measured tau and node count.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch

from ..errors import SpecqError

MS = [1, 2, 4, 8, 16, 32, 64, 128]


def expected_tokens(acc: list[float], k: int) -> float:
    """E[tokens per target forward] of a k-token chain with conditional acceptance acc[d] per depth."""
    e, p = 1.0, 1.0
    for d in range(k):
        p *= acc[d] if d < len(acc) else acc[-1]
        e += p
    return e


def plan(T: dict[int, float], acc: list[float], t_draft: float, max_k: int = 16, trees: dict | None = None):
    """T: {M: seconds} target forward times (interpolated between measured M); acc: conditional acceptance
    per depth; t_draft: seconds per drafted token; trees: {name: (tau, nodes, draft_seconds)}.
    -> list of (name, expected tok/s) best first."""
    if not T or 1 not in T:
        raise SpecqError("the latency curve needs T(1)")
    if any(not 0 <= a <= 1 for a in acc):
        raise SpecqError("acceptance rates must lie in [0, 1]")
    t_of = interp(T)
    out = [("none", 1.0 / T[1])]
    for k in range(1, max_k + 1):
        out.append((f"chain-{k}", expected_tokens(acc, k) / (t_of(k + 1) + k * t_draft)))
    for name, (tau, nodes, td) in (trees or {}).items():
        out.append((name, tau / (t_of(nodes) + td)))
    return sorted(out, key=lambda x: -x[1])


def interp(T: dict[int, float]):
    """Piecewise-linear T(m) through the measured points; beyond the last, proportional to m."""
    ms = sorted(T)

    def t_of(m):
        if m in T:
            return T[m]
        lo = max([x for x in ms if x <= m], default=ms[0])
        hi = min([x for x in ms if x >= m], default=ms[-1])
        if lo == hi:
            return T[lo] * m / lo
        return T[lo] + (T[hi] - T[lo]) * (m - lo) / (hi - lo)
    return t_of


def plan_structures(T: dict[int, float], profile: dict, costs: dict, plain_s: float | None = None,
                    max_chain: int = 8, hier_ms=range(2, 11), hier_tree: str = "tree-30-d3") -> list[dict]:
    """Rank draft structures by expected tokens/s from a target latency curve and an acceptance profile.

    T: {M: seconds} target forward over M tokens; profile: specq.bench.controlled.load_profile();
    costs (seconds, each optional): chain_token = one draft-model token; tree = {structure: EAGLE draft time
    per step}; keep = moving an accepted tree path's K/V; hier_round = one tree drafted on and verified by
    the intermediate model; int_token = one intermediate forward (after a fully accepted chain);
    step = fixed per-step overhead. plain_s: seconds per plainly decoded token (default T(1)).
    -> [{name, kind, size, tau, step_s, tok_s}] best first; "none" is plain decoding."""
    from .controlled import chain_cond, expected_accepted, hier_stats, struct_depth
    if not T or 1 not in T:
        raise SpecqError("the latency curve needs T(1)")
    t_of, st = interp(T), costs.get("step", 0.0)
    cc = chain_cond(profile)
    out = [dict(name="none", kind="none", size=0, tau=1.0, step_s=plain_s or T[1])]
    if costs.get("chain_token") is not None:
        for k in range(1, min(max_chain, profile["structures"]["chain"]["max_depth"]) + 1):
            out.append(dict(name=f"chain-{k}", kind="chain", size=k, tau=1 + expected_accepted(cc, k),
                            step_s=t_of(k + 1) + k * costs["chain_token"] + st))
    for name, td in (costs.get("tree") or {}).items():
        s = profile["structures"][name]
        out.append(dict(name=name, kind="tree", size=s["nodes"], tau=1 + expected_accepted(s["cond"], struct_depth(profile, name)),
                        step_s=t_of(s["nodes"]) + td + costs.get("keep", 0.0) + st))
    if costs.get("hier_round") is not None and hier_tree in profile["structures"]:
        tc = profile["structures"][hier_tree]["cond"]
        for m in hier_ms:
            ends, rounds = hier_stats(tc, struct_depth(profile, hier_tree), m)
            tau = sum(p * (1 + expected_accepted(cc, n)) for n, p in ends.items())
            full = sum(p * _all(cc, n) for n, p in ends.items())          # P(whole linear draft accepted)
            t = sum(p * t_of(n + 1) for n, p in ends.items()) + rounds * costs["hier_round"]
            out.append(dict(name=f"hier-{m}", kind="hier", size=m, tau=tau,
                            step_s=t + full * costs.get("int_token", 0.0) + st))
    for r in out:
        r["tok_s"] = r["tau"] / r["step_s"]
    return sorted(out, key=lambda r: -r["tok_s"])


def tau_bound(profile: dict, trees=(), hier_tree: str = "tree-30-d3") -> dict:
    """The largest expected tau (tokens per target forward, bonus included) among the structures plan_structures
    considers for this profile: {"tau": .., "structure": ..}. No speculative step beats plain decoding by more than
    this factor (it would need verification as cheap as one token and free drafting: speedup = tau * T(1) /
    step time <= tau), so it bounds every measured speedup under a controlled-acceptance profile."""
    costs = {"chain_token": 0.0, "tree": {t: 0.0 for t in trees if t in profile["structures"]}, "hier_round": 0.0}
    ranked = plan_structures({1: 1.0}, profile, costs, hier_tree=hier_tree)
    best = max(ranked, key=lambda r: r["tau"])
    return {"tau": best["tau"], "structure": best["name"]}


def _all(cond, n):  # probability that all n drafts of a chain are accepted
    p = 1.0
    for d in range(n):
        p *= cond[d] if d < len(cond) else 0.0
    return p


def time_forward(model, M: int, reps: int = 10, ctx: int = 256, compile: bool = False) -> float:
    """Median seconds of one target forward of M new tokens after ctx cached tokens, as the speculative engine
    runs it: the model's TreeRunner (a CUDA graph per bucket on GPU; compile: torch.compile'd first), wall time
    up to a synchronize."""
    from ..models.llama import causal_mask
    from ..spec.graphs import bucket, runner_for
    dev = model.device
    S = ctx + bucket(M) + 1                             # room for the padded bucket below the scratch slot
    model.setup_cache(S)
    run = runner_for(model, compile=True if compile else None)    # None: keep whichever runner the model has
    ids = torch.randint(0, model.cfg.vocab_size, (M,), device=dev)
    pos = torch.arange(ctx, ctx + M, device=dev)
    mask = causal_mask(ctx, M, S, dev)
    times = []
    with torch.no_grad():
        for r in range(reps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run.forward(ids, pos, pos, mask, ctx + M - 1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(a) -> int:
    from ..api import LLM
    ms = [int(m) for m in a.ms.split(",")]
    if not ms or min(ms) < 1:
        raise SpecqError("--ms must list positive token counts")
    if 1 not in ms:
        ms = [1] + ms
    rows = []
    for fmt in a.formats.split(","):
        quant = None if fmt == "none" else dict(fmt=fmt, method="rtn", group_size=a.group_size)
        llm = LLM(a.model, device=a.device, dtype=a.dtype, quant=quant)
        for M in ms:
            t = time_forward(llm.model, M, a.reps, compile=a.compile)
            rows.append({"format": fmt, "M": M, "ms": t * 1e3})
            print(f"{fmt:6s} M={M:4d} {t * 1e3:8.2f} ms", file=sys.stderr)
    for r in rows:
        t1 = next(x["ms"] for x in rows if x["format"] == r["format"] and x["M"] == 1)
        r["ratio_vs_M1"] = r["ms"] / t1
    res = {"rows": rows, "model": a.model, "command": "specq " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu",
           "date": datetime.date.today().isoformat(), "compile": a.compile}
    if a.acceptance:
        acc = [float(x) for x in a.acceptance.split(",")]
        for fmt in {r["format"] for r in rows}:
            T = {r["M"]: r["ms"] / 1e3 for r in rows if r["format"] == fmt}
            best = plan(T, acc, a.draft_ms / 1e3)
            res.setdefault("plan", {})[fmt] = best[:5]
            print(f"planner [{fmt}]: best {best[0][0]} ({best[0][1]:.1f} tok/s expected)")
    print("| format | M | ms | T(M)/T(1) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['M']} | {r['ms']:.2f} | {r['ratio_vs_M1']:.2f} |")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for fmt in sorted({r["format"] for r in rows}):
            xs = [r["M"] for r in rows if r["format"] == fmt]
            ax.plot(xs, [r["ratio_vs_M1"] for r in rows if r["format"] == fmt], marker="o", label=fmt)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward M")
        ax.set_ylabel("T(M) / T(1)")
        ax.set_title("verification cost")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    return 0


def add_parser(bsub):
    from ..cli import add_model_args
    s = bsub.add_parser("latency", help="target forward time vs tokens per forward (verification-cost curve)",
                        description="Time one target forward of M new tokens for each format and plot T(M)/T(1); "
                                    "with --acceptance, plan the draft size with the best expected tokens/s.")
    add_model_args(s)
    s.add_argument("--formats", default="none,w4a16,w8a8", help="comma list of formats (none = unquantized)")
    s.add_argument("--group-size", type=int, default=128, help="weight group size (default 128)")
    s.add_argument("--ms", default=",".join(map(str, MS)), help="comma list of M (default 1..128 powers of two)")
    s.add_argument("--reps", type=int, default=10, help="timed repetitions per point, median (default 10)")
    s.add_argument("--acceptance", default=None, help="conditional acceptance per depth, e.g. 0.8,0.7,0.6 (enables the planner)")
    s.add_argument("--draft-ms", type=float, default=1.0, help="planner: milliseconds per drafted token (default 1.0)")
    s.add_argument("--compile", action="store_true", help="GPU: time the torch.compile'd forward (what --compile runs)")
    s.add_argument("--out", default=None, help="write JSON here (and a .png plot beside it)")
    s.set_defaults(func=main)


def _median_s(fn, reps: int, cuda: bool) -> float:
    ts = []
    for r in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if r:
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


@torch.no_grad()
def auto_spec(llm, eagle_head: str | None = None, draft_model: str | None = None, profile: str | None = None,
              reps: int = 3, tree_depth: int = 6) -> dict:
    """`--spec auto`: measure, on the current device, plain decoding (specq's Decoder), the target's T(M)
    and per-step engine overhead, and the drafting time of the proposers available (the EAGLE head, at
    each tree size the acceptance profile has; a draft model's token if one was given), then rank with
    plan_structures. Acceptance comes from the stored profile (measured on SmolLM2 with real drafts).
    -> {"spec": kwargs for make_proposer_factory (method "none" = plain), "ranked": [...], "profile": path}."""
    from pathlib import Path as _P
    from ..engine import SpecEngine
    from ..generate import Decoder
    from ..models.llama import causal_mask
    from ..sampling import SamplingParams
    from ..spec.factory import BUNDLED_EAGLE, _load_side_model
    from .controlled import load_profile
    prof = load_profile(profile)
    model, dev = llm.model, llm.model.device
    cuda = dev.type == "cuda"
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (32,), generator=g)
    dec = Decoder(model, 64)
    dec.step_greedy(int(dec.prefill(prompt).argmax()))
    plain_s = _median_s(lambda: dec.step_greedy(None), 8, cuda)
    del dec
    T = {M: time_forward(model, M, reps, ctx=64) for M in (1, 2, 4, 8, 16, 32, 64)}
    _, m = SpecEngine(model, None, SamplingParams(), seed=0, max_len=256).generate(prompt.tolist(), 12)
    costs: dict = {"step": max(0.0, (m.t_total - m.t_prefill) / max(m.steps, 1) - T[1]), "tree": {}}
    head_dir = eagle_head or BUNDLED_EAGLE.get(llm.model_name)
    if head_dir is not None and _P(head_dir).exists():
        from ..spec.eagle import EagleProposer, load_head
        head = load_head(str(head_dir), model)
        model.setup_cache(256)
        pos = torch.arange(32, device=dev)
        logits, h = model(prompt.to(dev), pos, pos, causal_mask(0, 32, 256, dev))
        for name, s in prof["structures"].items():
            sp = s.get("spec", {})
            if sp.get("method") != "eagle" or sp.get("depth") != tree_depth:
                continue
            prop = EagleProposer(head, model, top_k=sp.get("top_k", 10), depth=tree_depth, total_tokens=s["nodes"])
            prop.setup(256)
            prop.prefill(prompt.to(dev), h, int(logits[-1].argmax()))
            t = _median_s(lambda: prop.propose(int(prompt[-1]), SamplingParams()), reps, cuda)
            costs["tree"][name] = t * (tree_depth + 2) / (tree_depth + 1)   # + the commit's head forward
        src = torch.arange(40, 44, device=dev)
        costs["keep"] = _median_s(lambda: model.keep(src, src - 8), reps, cuda)
    if draft_model:
        dm = _load_side_model(llm, draft_model, "draft model")
        costs["chain_token"] = time_forward(dm, 1, reps, ctx=64)
    ranked = plan_structures(T, prof, costs, plain_s=plain_s)
    best = ranked[0]
    if best["kind"] == "tree":
        s = prof["structures"][best["name"]]["spec"]
        spec = dict(method="eagle", total_tokens=best["size"], depth=s["depth"], top_k=s.get("top_k", 10),
                    eagle_head=str(head_dir))
    elif best["kind"] == "chain":
        spec = dict(method="draft", k=best["size"], draft_model=draft_model)
    else:
        spec = dict(method="none")
    return {"spec": spec, "choice": best["name"], "ranked": ranked, "profile": prof["source"]}
