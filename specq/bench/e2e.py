"""End-to-end decoding speed at Llama-3-8B / 70B shapes with random weights (bench/e2e.py).

Per (model, format): plain decoding with specq's Decoder (CUDA-graph step) next to the weight-bytes
roofline; the target's T(M) curve; speculative decoding with CONTROLLED acceptance (specq.bench.controlled:
accepted lengths drawn from a profile measured on SmolLM2 with real drafts, fixed seed) where every step
does the real GPU work of the right shapes (specq.bench.e2e_units):
  chain-k   k forwards of a Llama-3.2-1B-shaped draft model, target verifies k+1 tokens (causal)
  tree-N    EAGLE-2 head (one decoder layer of the target's width + its lm_head) grows an N-node tree,
            target verifies it with the tree mask, the accepted path's K/V is moved into place
  hier-m    EAGLE head on the 1B model drafts a 30-node tree, the 1B model verifies it (tree mask),
            repeated until the linear draft has >= m tokens; the target verifies that chain
and the planner's choice (plan_structures on the measured T(M) and draft costs) next to the measured best.
--quant-head: the target's lm_head in W4A16 too in w4a16 phases (gpt-fast's int4 mode); row key lm_head.
"""
from __future__ import annotations

import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

from ..errors import SpecqError
from .controlled import (Acceptance, chain_cond, load_profile, mean_sd, path_to_depth, step_tokens_dist, struct_depth,
                         tree_shape)
from .e2e_units import ChainDrafter, EagleDrafter, Graphs, Keeper, Verifier, chain_parents
from .latency import plan_structures, tau_bound
from .randmodel import FORMATS, build_eagle_head, build_random, config, weight_bytes_per_token

H100_BW = 3.35e12          # bytes/s, H100 SXM HBM3 (the roofline's bandwidth)
MS = (1, 2, 4, 8, 16, 32, 64)
HIER_TREE = "tree-30-d3"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def parse_method(name: str):
    kind, _, size = name.rpartition("-")
    if name.startswith("tree-"):
        return "tree", name
    if kind not in ("chain", "hier") or not size.isdigit() or int(size) < 1:
        raise SpecqError(f"unknown method {name!r} (chain-K, tree-N, hier-M)")
    return kind, int(size)


class Side:
    """The 1B-shaped draft / intermediate model and the EAGLE head on it (shared by every target)."""

    def __init__(self, shape: str, device, dtype, S: int, fmt: str = "bf16", quant_head: bool = False):
        self.model = build_random(config(shape), fmt, device, dtype, seed=2, quant_head=quant_head)
        self.model.setup_cache(S)
        self.head = build_eagle_head(self.model, device, dtype, seed=3)
        self.head.setup_cache(S + 64)


class Phase:
    """One target (model shape, format) with its EAGLE head and the work units of every method."""

    def __init__(self, target, side: Side | None, S: int, P: int, top_k: int = 10, compile: bool = False):
        dev = target.device
        self.target, self.side, self.S, self.P, self.dev = target, side, S, P, dev
        self.g = Graphs(dev)
        target.setup_cache(S)
        self.head = build_eagle_head(target, dev, target.dtype)
        self.head.setup_cache(S + 8 * top_k)
        for m in [target] + ([side.model] if side else []):
            for layer in m.layers:                       # a context of random K/V (never zeros)
                layer.self_attn.cache.k.normal_()
                layer.self_attn.cache.v.normal_()
        self.tv, self.tkeep = Verifier(target, S, self.g, "T", compile), Keeper(target, 16, self.g, "T")
        self.eagle = EagleDrafter(self.head, S + 8 * top_k, self.g, "E", top_k, compile=compile)
        if side:
            self.dv, self.dkeep = Verifier(side.model, S, self.g, "D", compile), Keeper(side.model, 16, self.g, "D")
            self.chain = ChainDrafter(side.model, S, self.g, "D", compile)
            self.seagle = EagleDrafter(side.head, S + 64, self.g, "e", top_k, compile=compile)

    def release(self):
        self.g.graphs.clear()
        for layer in self.target.layers:
            layer.self_attn.cache = None
        self.target = self.head = self.eagle = self.tv = self.tkeep = None


def run_plain(target, S: int, P: int, n: int, compile: bool = False) -> float:
    """Plain greedy decoding with specq's Decoder (compile: torch.compile'd step, quantized matmuls as opaque
    ops): seconds per token (prefill excluded). The loop is specq.generate's: step i + 1 is launched before token
    i is read (Decoder.launch_greedy / next_greedy), so the GPU does not wait on the host between tokens."""
    from ..generate import Decoder
    dev = target.device
    dec = Decoder(target, S, compile=compile)
    logits = dec.prefill(torch.randint(0, target.cfg.vocab_size, (P,)))
    dec.launch_greedy(int(logits.argmax()))
    for _ in range(3):
        dec.launch_greedy(None)
        dec.next_greedy()
    sync(dev)                                            # one step in flight: done before the clock starts
    t0 = time.perf_counter()
    for _ in range(n):
        dec.launch_greedy(None)
        dec.next_greedy()
    sync(dev)
    dt = (time.perf_counter() - t0) / n
    del dec
    return dt


def make_step(ph: Phase, name: str, prof: dict, acc: Acceptance):
    """-> (step(L) -> accepted drafts, list of preparation calls capturing every shape the step uses)."""
    kind, size = parse_method(name)
    cc = chain_cond(prof)
    if kind == "chain":
        par = chain_parents(size + 1)

        def step(L):
            ph.chain.run(size, L)
            out, _ = ph.tv.run(par, L)
            int(out[0])                                  # the verifier reads the target's tokens
            return acc.draw(cc, size)
        return step, [lambda: step(ph.P)]
    if kind == "tree":
        s = prof["structures"][size]
        par, dmax, depth, N = tree_shape(prof, size), struct_depth(prof, size), s["spec"]["depth"], s["nodes"]
        st = {"a": 1}

        def step(L):
            ph.eagle.commit(st["a"], L)
            ph.eagle.tree(depth, N, L)
            out, h = ph.tv.run(par, L)
            int(out[0])
            a = acc.draw(s["cond"], dmax)
            if a:
                ph.tkeep.run(path_to_depth(par, a), L)
            ph.eagle.feats[:a + 1].copy_(h[:a + 1])
            st["a"] = a + 1
            return a
        prep = [lambda a=a: ph.eagle.commit(a, ph.P) for a in range(1, dmax + 2)]
        prep += [lambda: ph.tkeep.run(path_to_depth(par, 1), ph.P), lambda: step(ph.P)]
        return step, prep
    s = prof["structures"][HIER_TREE]
    par, dmax, depth, N = tree_shape(prof, HIER_TREE), struct_depth(prof, HIER_TREE), s["spec"]["depth"], s["nodes"]
    st = {"a": 1}

    def step(L):
        n, LI = 0, L
        while n < size:                                  # intermediate level: trees until >= size tokens
            ph.seagle.commit(st["a"], LI)
            ph.seagle.tree(depth, N, LI)
            out, h = ph.dv.run(par, LI)
            int(out[0])
            a = acc.draw(s["cond"], dmax)
            if a:
                ph.dkeep.run(path_to_depth(par, a), LI)
            ph.seagle.feats[:a + 1].copy_(h[:a + 1])
            st["a"] = a + 1
            n, LI = n + a + 1, LI + a + 1
        out, _ = ph.tv.run(chain_parents(n + 1), L)      # target verifies the linear draft
        int(out[0])
        at = acc.draw(cc, n)
        if at == n:                                      # all accepted: the intermediate runs the last token
            ph.dv.run([-1], L + n)
        return at
    prep = [lambda a=a: ph.seagle.commit(a, ph.P) for a in range(1, dmax + 2)]
    prep += [lambda n=n: ph.tv.run(chain_parents(n + 1), ph.P) for n in range(size, size + dmax + 1)]
    prep += [lambda: ph.dkeep.run(path_to_depth(par, 1), ph.P), lambda: ph.dv.run([-1], ph.P), lambda: step(ph.P)]
    return step, prep


def run_spec(ph: Phase, name: str, prof: dict, n_tokens: int, seed: int = 0) -> dict:
    step, prep = make_step(ph, name, prof, Acceptance(seed + 1))
    for f in prep:                                       # capture every graph before timing
        f()
    acc = Acceptance(seed)
    step, _ = make_step(ph, name, prof, acc)
    L, emitted, steps = ph.P, 0, 0
    sync(ph.dev)
    t0 = time.perf_counter()
    while emitted < n_tokens:
        a = step(L)
        L, emitted, steps = L + a + 1, emitted + a + 1, steps + 1
    sync(ph.dev)
    dt = time.perf_counter() - t0
    return {"tokens": emitted, "steps": steps, "seconds": dt, "tok_s": emitted / dt, "tau": emitted / steps}


def measure_costs(ph: Phase, prof: dict, trees: list[str], reps: int, ms=MS) -> tuple[dict, dict]:
    """T(M) of the target (causal chains, mid-context) and the draft costs the planner needs."""
    L, g = ph.P + 32, ph.g
    T = {M: g.time(lambda M=M: ph.tv.run(chain_parents(M), L), reps, wall=True) for M in ms}   # as the loop sees it
    costs = {"tree": {}, "keep": g.time(lambda: ph.tkeep.run(path_to_depth(chain_parents(4), 3), L), reps)}
    for name in trees:
        s = prof["structures"][name]
        costs["tree"][name] = g.time(lambda s=s: (ph.eagle.commit(2, L), ph.eagle.tree(s["spec"]["depth"], s["nodes"], L)), reps)
    if ph.side:
        costs["chain_token"] = g.time(lambda: ph.chain.run(1, L), reps)
        costs["int_token"] = g.time(lambda: ph.dv.run([-1], L), reps)
        s = prof["structures"][HIER_TREE]
        par = tree_shape(prof, HIER_TREE)

        def rnd():
            ph.seagle.commit(2, L)
            ph.seagle.tree(s["spec"]["depth"], s["nodes"], L)
            ph.dv.run(par, L)
            ph.dkeep.run(path_to_depth(par, 1), L)
        costs["hier_round"] = g.time(rnd, reps, wall=True)             # one sync per round
    return T, costs


def bench_phase(res: dict, model_name: str, shape: str, fmt: str, side: Side | None, spec: bool, a, prof: dict,
                t_end: float):
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cfg = config(shape)
    t0 = time.perf_counter()
    qh = a.quant_head and fmt == "w4a16"                 # the target's lm_head in W4A16 too (gpt-fast int4)
    target = build_random(cfg, fmt, dev, dtype, share_codes=cfg.num_layers * cfg.hidden_size >= 80 * 8192,
                          quant_head=qh)
    roof = H100_BW / weight_bytes_per_token(cfg, fmt, quant_head=qh)
    label = f"controlled:{prof['name']}"
    base = dict(model=model_name, format=fmt, lm_head="w4a16" if qh else "bf16", roofline_tok_s=roof,
                step=("compiled-blocks" if a.compile_mode == "blocks" else "compiled") if a.compile else "graph")
    S = a.prompt + a.tokens + 256
    plain = run_plain(target, S, a.prompt, a.plain_tokens, compile=a.compile)
    if a.compile_plain:   # the compiled step beside the graph-only one (rows keep the graph-only baseline)
        try:
            res.setdefault("plain_compiled", []).append(
                {"model": model_name, "format": fmt, "lm_head": base["lm_head"],
                 "tok_s": 1 / run_plain(target, S, a.prompt, a.plain_tokens, True), "graph_only_tok_s": 1 / plain})
            log(f"  compiled plain step: {res['plain_compiled'][-1]['tok_s']:.1f} tok/s")
        except Exception as e:  # report and go on
            res["errors"].append(f"{model_name} {fmt}: compiled plain step failed: {type(e).__name__}: {e}"[:300])
    log(f"[{time.perf_counter() - a.t_start:5.0f}s] {model_name} {fmt}{' (W4A16 lm_head)' if qh else ''}: built+plain in {time.perf_counter() - t0:.1f}s: "
        f"{1 / plain:.1f} tok/s (roofline {roof:.0f})")
    res["rows"].append({**base, "method": "none", "structure": "none", "acceptance": "none", "tok_s": 1 / plain,
                        "tau": 1.0, "speedup": 1.0})
    if not spec or side is None or time.perf_counter() > t_end:
        if spec:
            log(f"  out of time: skipping speculative runs for {model_name} {fmt}")
            res["errors"].append(f"{model_name} {fmt}: speculative runs skipped (time budget)")
        del target
        return
    ph = Phase(target, side, S, a.prompt, compile=a.compile)
    trees = [m for m in a.methods if m.startswith("tree-")]
    T, costs = measure_costs(ph, prof, trees, a.reps, getattr(a, "ms", MS))
    res["latency"] += [{"model": model_name, "format": fmt, "M": M, "ms": t * 1e3, "ratio_vs_M1": t / T[1]} for M, t in T.items()]
    ranked = plan_structures(T, prof, costs, plain_s=plain)
    bound = tau_bound(prof, trees, HIER_TREE)
    pred = {r["name"]: r for r in ranked}
    choice = ranked[0]["name"]
    log(f"  T(M) ms: " + " ".join(f"{M}:{t * 1e3:.2f}" for M, t in T.items()) + f" | planner: {choice} "
        f"({ranked[0]['tok_s']:.0f} tok/s expected)")
    methods = list(a.methods) + ([choice] if choice not in a.methods and choice != "none" else [])
    measured, norm = {"none": 1 / plain}, {"none": 1 / plain}
    for name in methods:
        if time.perf_counter() > t_end:
            log(f"  out of time: skipping {name}")
            continue
        r = run_spec(ph, name, prof, a.tokens, a.seed)
        kind, _ = parse_method(name)
        etau = mean_sd(step_tokens_dist(prof, name))[0]
        measured[name], norm[name] = r["tok_s"], r["tok_s"] * etau / r["tau"]
        res["rows"].append({**base, "method": kind, "structure": name, "acceptance": label, "tok_s": r["tok_s"],
                            "tau": r["tau"], "speedup": r["tok_s"] * plain, "steps": r["steps"], "tokens": r["tokens"],
                            "expected_tau": etau, "tok_s_at_expected_tau": norm[name],
                            "predicted_tok_s": pred[name]["tok_s"] if name in pred else None})
        log(f"  {name:10s} {r['tok_s']:8.1f} tok/s  tau {r['tau']:.2f}  ({r['tok_s'] * plain:.2f}x plain; "
            f"predicted {pred[name]['tok_s'] if name in pred else float('nan'):.1f})")
    best, nbest = max(measured, key=measured.get), max(norm, key=norm.get)
    res["planner"].append({"model": model_name, "format": fmt, "choice": choice, "predicted_tok_s": ranked[0]["tok_s"],
                           "choice_tok_s": measured.get(choice), "best": best, "best_tok_s": measured[best],
                           "ratio": (measured[choice] / measured[best]) if choice in measured else None,
                           "best_at_expected_tau": nbest,
                           "ratio_at_expected_tau": (norm[choice] / norm[nbest]) if choice in norm else None,
                           "costs_ms": {k: ({n: t * 1e3 for n, t in v.items()} if isinstance(v, dict) else v * 1e3)
                                        for k, v in costs.items()},
                           "top5": [(r["name"], r["tok_s"]) for r in ranked[:5]],
                           "speedup_bound": bound["tau"], "speedup_bound_structure": bound["structure"]})
    log(f"  speedup bound of this profile: {bound['tau']:.2f}x ({bound['structure']}: its expected tau; free drafting "
        f"and verification)")
    ph.release()
    del ph, target


def free(dev):
    torch._dynamo.reset()      # compiled code keeps the finished phase's model alive through its guards
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def write(res: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(res, indent=1))


def table(res: dict) -> str:
    lines = ["| model | format | method | acceptance | tok/s | tau | speedup | roofline tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['format']} | {r.get('structure', r['method'])} | {r['acceptance']} | "
                     f"{r['tok_s']:.1f} | {r['tau']:.2f} | {r.get('speedup') or float('nan'):.2f}x | {r['roofline_tok_s']:.0f} |")
    lines += ["", "| model | format | planner choice | its tok/s | measured best | best tok/s | ratio | ratio at expected tau |",
              "|---|---|---|---|---|---|---|---|"]
    rnd = lambda x, n: x if x is None else round(x, n)  # noqa: E731
    for p in res["planner"]:
        lines.append(f"| {p['model']} | {p['format']} | {p['choice']} | {rnd(p['choice_tok_s'], 1)} | {p['best']} | "
                     f"{p['best_tok_s']:.1f} | {rnd(p['ratio'], 3)} | {rnd(p['ratio_at_expected_tau'], 3)} "
                     f"({p['best_at_expected_tau']}) |")
    return "\n".join(lines)


GPU_PHASES = ("llama3-8b:w4a16:spec,llama3-70b:w4a16:spec,llama3-8b:bf16:spec,llama3-8b:w8a8:spec,"
              "llama3-8b:w4a8:spec,llama3-70b:w4a8:spec,llama3-70b:w8a8:plain")
METHODS = "chain-2,chain-3,chain-4,chain-6,chain-8,tree-10,tree-20,tree-30,tree-30-d3,tree-60,hier-4,hier-6,hier-8"
REAL_ROWS = Path(__file__).resolve().parents[2] / "bench" / "results" / "h100" / "spec_smollm2_small.json"


def real_rows(path: Path) -> list[dict]:
    """SmolLM2 rows measured with real drafts on an H100 (specq bench spec), overall, T=0."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    roof = H100_BW / weight_bytes_per_token(config("smollm2"), "bf16")
    plain = {r["temperature"]: r["tok_s"] for r in d["rows"] if r["method"] == "none" and r["category"] == "overall"}
    out = []
    for r in d["rows"]:
        if r["category"] == "overall" and r["temperature"] == 0:
            out.append(dict(model="smollm2", format="bf16", lm_head="bf16", method=r["method"], structure=r["method"],
                            acceptance="real" if r["method"] != "none" else "none", tok_s=r["tok_s"], tau=r["tau"],
                            speedup=r["tok_s"] / plain[0.0], roofline_tok_s=roof, device=r.get("device"),
                            source=f"{path.name} ({d.get('date')})"))
    return out


def parse_args(argv):
    import argparse
    p = argparse.ArgumentParser(prog="bench/e2e.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (e2e.json + PNG plots)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--phases", default=GPU_PHASES, help="comma list of model:format:spec|plain")
    p.add_argument("--methods", default=METHODS, help="speculative structures to run (chain-K, tree-N, hier-M)")
    p.add_argument("--tokens", type=int, default=192, help="tokens generated per speculative run")
    p.add_argument("--plain-tokens", type=int, default=64, help="tokens timed for plain decoding")
    p.add_argument("--prompt", type=int, default=64, help="context length before the timed tokens")
    p.add_argument("--reps", type=int, default=10, help="repetitions of each T(M) / draft-cost timing (median)")
    p.add_argument("--seed", type=int, default=0, help="acceptance draws seed")
    p.add_argument("--profile", default=None, help="acceptance profile JSON (default: the SmolLM2 one)")
    p.add_argument("--side-shape", default="llama3.2-1b", help="draft / intermediate model shape")
    p.add_argument("--side-format", default="bf16", choices=FORMATS, help="draft / intermediate model weight format (bf16, w4a16, "
                   "...; the acceptance profile's chain drafts were a 4-bit copy of the target)")
    p.add_argument("--quant-head", action="store_true", help="quantize the target's lm_head to W4A16 too (w4a16 "
                   "phases only), as gpt-fast int4 does (row key lm_head: w4a16 / bf16; side models: --side-quant-head)")
    p.add_argument("--side-quant-head", action="store_true", help="the draft / intermediate model's lm_head in W4A16 too "
                   "(needs --side-format w4a16; recorded under side.lm_head)")
    p.add_argument("--tiny", action="store_true", help="toy shapes for every model (CPU tests)")
    p.add_argument("--time-budget", type=float, default=320.0, help="seconds after which optional runs are skipped")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="token counts M of the measured T(M) curve (the "
                   "planner interpolates between them; keep the largest >= the biggest structure verified)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--compile", action="store_true", help="every forward (plain step, verification, draft-model "
                   "step) torch.compile'd, then captured as CUDA graphs (row key step: compiled / graph)")
    p.add_argument("--compile-mode", default="whole", choices=("whole", "blocks"), help="with --compile: one "
                   "torch.compile of each whole forward (whole), or each model's decoder layer compiled once for all "
                   "its layers with the loop around them eager (blocks: regional compilation, far shorter compiles)")
    p.add_argument("--compile-plain", action="store_true", help="also time plain decoding with the torch.compile'd "
                   "step (JSON key plain_compiled)")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    try:
        a.ms = tuple(sorted({int(v) for v in a.ms.split(",") if v}))
    except ValueError:
        raise SpecqError(f"--ms: a comma list of integers, not {a.ms!r}") from None
    if not a.ms or a.ms[0] != 1 or a.ms[-1] > 128:
        raise SpecqError(f"--ms must start at 1 and stay <= 128 (got {a.ms})")
    for m in a.methods:
        parse_method(m)
    a.phases = [tuple(x.split(":")) for x in a.phases.split(",") if x]
    if any(len(x) != 3 or x[2] not in ("spec", "plain") for x in a.phases):
        raise SpecqError("--phases items must be model:format:spec|plain")
    if a.side_quant_head and a.side_format != "w4a16":
        raise SpecqError(f"--side-quant-head needs --side-format w4a16 (got {a.side_format})")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from ..models import llama
    saved, llama.COMPILE_BLOCKS = llama.COMPILE_BLOCKS, a.compile and a.compile_mode == "blocks"
    try:
        return _main(a, sys.argv[1:] if argv is None else argv)
    finally:
        llama.COMPILE_BLOCKS = saved


def _main(a, argv) -> int:
    a.t_start = time.perf_counter()
    if a.compile:   # one compiled function per work unit and model: more than dynamo's default 8 entries
        import torch._dynamo.config as dcfg
        for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dcfg, k):
                setattr(dcfg, k, max(getattr(dcfg, k), 256))
    dev = torch.device(a.device)
    prof = load_profile(a.profile)
    have = prof["structures"]
    drop = [m for m in a.methods if (m.startswith("tree-") and m not in have) or (m.startswith("hier-") and HIER_TREE not in have)]
    if drop:
        log(f"not in the acceptance profile, skipped: {', '.join(drop)}")
    a.methods = [m for m in a.methods if m not in drop]
    out = Path(a.out)
    res = {"rows": [], "latency": [], "planner": [], "errors": [],
           "command": "PYTHONPATH=$PWD python3 bench/e2e.py " + " ".join(argv),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "side": {"shape": a.side_shape, "format": a.side_format,
                                                     "lm_head": "w4a16" if a.side_quant_head else "bf16"},
           "quant_head": a.quant_head,
           "profile": {"name": prof["name"], "source": prof["source"],
                       "structures": {k: {"tau": v.get("tau"), "cond": v["cond"], "nodes": v["nodes"]}
                                      for k, v in prof["structures"].items()}},
           "notes": ("random weights; 'controlled:<profile>' = accepted lengths drawn (fixed seed) from per-depth "
                     "acceptance measured on SmolLM2 with real drafts (chain: 4-bit copy of the target; trees: the "
                     "bundled EAGLE-2 head), every step doing the real GPU work of the right shapes (CUDA graphs; rows with step 'compiled': "
                     "the plain step, the verification and draft-model forwards torch.compile'd first); "
                     "chain acceptance beyond the measured depth is taken as 0. tok_s = decode tokens/s (prefill "
                     "excluded); tau = tokens per target forward incl. the bonus token; roofline_tok_s = "
                     f"{H100_BW:.3g} B/s / weight bytes read per token (decoder linears as the kernels store them "
                     "+ the lm_head: bf16, or W4A16 with --quant-head (row key lm_head); KV cache excluded), the same for "
                     "every row of a model/format; "
                     "speedup = tok_s / plain tok_s of the same model and format in this run. "
                     "smollm2 rows with acceptance 'real' are copied from the H100 run in their 'source'.")}
    res["rows"] += real_rows(REAL_ROWS)
    deadline = a.t_start + a.time_budget
    side = None
    for model_name, fmt, mode in a.phases:
        shape = "tiny" if a.tiny else model_name
        spec = mode == "spec"
        if time.perf_counter() > deadline + 30:
            log(f"out of time: skipping {model_name} {fmt}")
            res["errors"].append(f"{model_name} {fmt}: skipped (time budget)")
            continue
        try:
            if spec and side is None:
                side = Side("tiny-1b" if a.tiny else a.side_shape, dev, getattr(torch, a.dtype),
                            a.prompt + a.tokens + 256, a.side_format, a.side_quant_head)
            if not spec and side is not None:      # a plain-only phase may need all the memory
                side = None
                free(dev)
            bench_phase(res, model_name, shape, fmt, side, spec, a, prof, deadline)
        except Exception as e:  # one failed phase must not lose the others' results
            log(f"FAILED {model_name} {fmt}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            res["errors"].append(f"{model_name} {fmt}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        free(dev)
        res["elapsed_s"] = time.perf_counter() - a.t_start
        write(res, out)
    if not a.no_plot:
        try:
            from .e2e_plot import plot
            plot(res, out)
        except ImportError as e:
            log(f"no plots: {e}")
    print(table(res))
    return 0
