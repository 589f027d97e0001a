"""`--compensate` option: a fixed k fraction, or k per projection tuned to a slowdown budget.

    --compensate k=0.01                  every projection selects 1% of its input channels
    --compensate k=0.01,selector=exact   exact top-k instead of the approximate bucket top-k
    --compensate budget=5%               k per projection (qkv, o, gate_up, down) that selects the most input
                                         channels of a layer while the layer's four Linears together slow down
                                         by at most 5% (scope=layer, the default)
    --compensate budget=5%,scope=linear  per projection the largest k whose slowdown of that Linear alone stays
                                         within 5% (each Linear on its own: fewer channels where the
                                         compensation hides behind long GEMVs)
Tuning times the first layer's Linears on the model's device, base alone vs compensated at growing k per chunk,
median of `reps` runs. scope=layer then picks the k per projection with the most channels whose summed extra time
fits the budget of the summed base times, times the four Linears in a row with that choice, and shrinks the choice
while that measured slowdown is over the budget. On a GPU each run replays a CUDA graph of GRAPH_CALLS back-to-back calls, as decoding runs a
Linear (graph replay, programmatic dependent launch between the kernels). An eager call's time is mostly the host's
launch gaps, so the same extra microseconds would look like a smaller slowdown than decoding sees. On the CPU: wall
clock of one call.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..errors import SpecqError
from .linear import compensate_model, compensated_modules
from .select import k_chunk_for

PROJ = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
K_CHUNKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GRAPH_CALLS = 16
CHAIN_LAYERS = 4       # scope=layer: the choice is checked on this many distinct layers in a row


def parse_spec(spec: str) -> dict:
    """'k=0.01[,selector=approx]' | 'budget=5%' | 'off' -> {k_fraction | budget, selector}."""
    out = {"selector": "approx"}
    s = (spec or "").strip().lower()
    if s in ("", "off", "none", "0"):
        return {}
    for part in s.split(","):
        key, eq, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or not val:
            raise SpecqError(f"bad --compensate {spec!r}: expected k=FRACTION or budget=PERCENT")
        try:
            if key == "k":
                v = float(val.rstrip("%")) / (100 if val.endswith("%") else 1)
                if not 0 < v <= 1:
                    raise ValueError
                out["k_fraction"] = v
            elif key == "budget":
                v = float(val.rstrip("%")) / (100 if val.endswith("%") else 1)
                if not 0 < v < 10:
                    raise ValueError
                out["budget"] = v
            elif key == "selector":
                if val not in ("exact", "approx"):
                    raise ValueError
                out["selector"] = val
            elif key == "scope":
                if val not in ("layer", "linear"):
                    raise ValueError
                out["scope"] = val
            else:
                raise SpecqError(f"bad --compensate {spec!r}: unknown key {key!r} (k, budget, scope, selector)")
        except ValueError:
            raise SpecqError(f"bad --compensate value {part!r} (k in (0, 1], budget like 5%, scope layer|linear, "
                             f"selector exact|approx)") from None
    if ("k_fraction" in out) == ("budget" in out):
        raise SpecqError(f"bad --compensate {spec!r}: give exactly one of k=... or budget=...")
    if "scope" in out and "budget" not in out:
        raise SpecqError(f"bad --compensate {spec!r}: scope= goes with budget=")
    return out


def add_compensate_arg(parser, saved: bool = False):
    """--compensate SPEC; saved: `specq quantize`, which writes the residuals into the checkpoint."""
    parser.add_argument("--compensate", default=None, metavar="SPEC",
                        help="dynamic error compensation of low-bit weights (QDEC): k=0.01 (fraction of input "
                             "channels), or budget=5%% (k per projection tuned on this device so that a layer's "
                             "Linears slow down by at most 5%%; budget=5%%,scope=linear: each Linear on its own); "
                             "append ,selector=exact for exact top-k" +
                             ("; the 4-bit residuals and calibration statistics are saved with the checkpoint "
                              "(residual.safetensors) and the spec applies whenever it is loaded (budget= is tuned "
                              "on the loading device; --compensate there overrides it)" if saved else
                              "; a checkpoint saved by `specq quantize --compensate` applies its own spec unless "
                              "this overrides it (off: none)"))
    return parser


def _time_fn(fn, device, reps: int) -> float:
    """Median seconds of fn()."""
    ts = []
    for i in range(reps + 2):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter(); fn(); dt = time.perf_counter() - t0
        if i >= 2:
            ts.append(dt)
    return statistics.median(ts)


def graph_of(fn, calls: int = 1, warm: int = 2) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` back-to-back calls of fn(), captured after `warm` eager rounds of them on a side stream
    (compilation, and buffers that must exist before a capture): specq.spec.graphs.capture."""
    from ..spec.graphs import capture

    def run():
        for _ in range(calls):
            fn()
    return capture(run, warm)[0]


def _time_graph(fn, reps: int, calls: int = GRAPH_CALLS, refresh=None) -> float:
    """Median seconds per call of fn() on the current CUDA device: graph_of(fn, calls) replayed reps times;
    refresh() (not timed) before each replay."""
    g = graph_of(fn, calls)
    ts = []
    for i in range(reps + 2):
        if refresh is not None:
            refresh()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        if i >= 2:
            ts.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(ts)


def _inputs(cls) -> tuple[list, callable]:
    """Per call of a timing graph, fresh inputs for each module of cls: ([[x of cl] per call], refresh). Each call
    reads its own inputs, refreshed with new random values before every replay: the chosen channels, so the residual
    rows fetched, change from call to call as from token to token (one input for every call fetched the same host
    rows each time, which the host's caches may serve faster than decoding sees them)."""
    dev = cls[0].base.scales.device if hasattr(cls[0].base, "scales") else torch.device("cpu")
    dtype = cls[0].base.scales.dtype if hasattr(cls[0].base, "scales") else torch.float32
    n = GRAPH_CALLS if dev.type == "cuda" else 1
    flat = torch.randn(n, sum(cl.in_features for cl in cls), device=dev, dtype=dtype)
    xs, o = [], 0
    for cl in cls:
        xs.append(flat[:, o:o + cl.in_features])
        o += cl.in_features
    return [[x[i:i + 1] for x in xs] for i in range(n)], flat.normal_


def _cycle(cls, per_call):
    """fn() running every module of cls on the next call's inputs (cycling through per_call)."""
    i = [0]

    def fn():
        xs = per_call[i[0] % len(per_call)]
        i[0] += 1
        for cl, x in zip(cls, xs):
            cl(x)
    return fn


def _time_modules(cls, reps: int) -> float:
    """Seconds of one decode-step call of each module of cls in turn: on CUDA per round of a graph of GRAPH_CALLS
    rounds (fresh inputs per round and replay), on the CPU the wall clock of one round."""
    per_call, refresh = _inputs(cls)
    fn = _cycle(cls, per_call)
    dev = per_call[0][0].device
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            return _time_graph(fn, reps, refresh=refresh)
    return _time_fn(fn, dev, reps)


@torch.inference_mode()
def measure_layer(cl, k_chunk: int, reps: int = 20) -> float:
    """Seconds of one decode-step (1 token) call of CompensatedLinear cl at k_chunk (0 = base alone): on CUDA per
    call of a graph of GRAPH_CALLS calls (each on its own fresh input), on the CPU the wall clock of one call."""
    old = cl.k_chunk
    cl.set_k(k_chunk)
    try:
        return _time_modules([cl], reps)
    finally:
        cl.set_k(old)


def tune_module(cl, budget: float, measure=measure_layer, k_chunks=K_CHUNKS) -> int:
    """The largest k per chunk of the ladder whose measured slowdown of CompensatedLinear cl is <= budget (0: none);
    the ladder stops at the first step over the budget."""
    t0 = measure(cl, 0)
    best = 0
    for kc in k_chunks:
        if kc > cl.chunk:
            break
        if (measure(cl, kc) - t0) / t0 <= budget:
            best = kc
        else:
            break
    return best


@torch.inference_mode()
def measure_chain(layers: list, k_chunks: dict, reps: int = 20) -> float:
    """Seconds of one decode-step call of every CompensatedLinear of layers [{projection: cl}, ...] (distinct layers,
    as decoding runs them), one after another, each on its own random input, at k_chunks {projection: k per chunk}:
    on CUDA per round of a CUDA graph of GRAPH_CALLS rounds (fresh inputs per round), on the CPU the wall clock of
    one round. Each module's k is restored."""
    cls = [cl for mods in layers for cl in mods.values()]
    old = [cl.k_chunk for cl in cls]
    for mods in layers:
        for p, cl in mods.items():
            cl.set_k(k_chunks.get(p, 0))
    try:
        return _time_modules(cls, reps)
    finally:
        for cl, k in zip(cls, old):
            cl.set_k(k)


def ladder(cl, limit: float, t0: float, measure=measure_layer, k_chunks=K_CHUNKS) -> list:
    """[(k per chunk, extra seconds over the base time t0), ...] of cl along the ladder, up to the first step whose
    extra exceeds `limit` seconds (not included); extras below zero (noise) count as zero."""
    out = []
    for kc in k_chunks:
        if kc > cl.chunk:
            break
        e = max(measure(cl, kc) - t0, 0.0)
        if e > limit:
            break
        out.append((kc, e))
    return out


def pick(options: dict, n_chunks: dict, allowed: float) -> dict:
    """The k per chunk per projection with the most selected channels (sum of k * chunks; ties: the least extra time)
    whose summed extra time is <= allowed. options {projection: [(k per chunk, extra seconds), ...]} (k = 0, no
    extra, is always an option). Exhaustive: at most a dozen steps for each of four projections."""
    best = ({p: 0 for p in options}, 0, 0.0)
    projs = list(options)

    def walk(i, chosen, ch, ex):
        nonlocal best
        if ex > allowed:
            return
        if i == len(projs):
            if ch > best[1] or (ch == best[1] and ex < best[2]):
                best = (dict(chosen), ch, ex)
            return
        p = projs[i]
        for kc, e in [(0, 0.0)] + list(options[p]):
            chosen[p] = kc
            walk(i + 1, chosen, ch + kc * n_chunks[p], ex + e)
        del chosen[p]
    walk(0, {}, 0, 0.0)
    return best[0]


def tune_layer(mods: dict, budget: float, measure=measure_layer, chain=measure_chain, k_chunks=K_CHUNKS,
               rounds: int = 6, layers: list | None = None, log=None) -> dict:
    """k per chunk per projection {projection: k} for one layer's CompensatedLinears mods {projection: cl}: the most
    selected channels whose layer slowdown is <= budget. Each Linear's extra time is measured along the ladder; the
    choice whose summed extra fits budget x the summed base times is then timed as decoding runs it (chain: the
    Linears of `layers`, default [mods], one after another); while that slowdown is over the budget, the allowed
    extra shrinks in proportion (with a 10% margin) and the choice is made again (at most `rounds` times; then
    none)."""
    t0 = {p: measure(cl, 0) for p, cl in mods.items()}
    allowed = budget * sum(t0.values())
    opts = {p: ladder(cl, allowed, t0[p], measure, k_chunks) for p, cl in mods.items()}
    n = {p: cl.n_chunks for p, cl in mods.items()}
    choice = pick(opts, n, allowed)
    if chain is None or not any(choice.values()):
        return choice
    for _ in range(rounds):
        b0, b1 = chain(layers or [mods], {}), chain(layers or [mods], choice)
        slow = (b1 - b0) / b0
        if log:
            log(f"tune_layer: k per chunk {choice}: summed extra {100 * allowed / sum(t0.values()):.1f}% allowed, "
                f"chain of {len(layers or [mods])} layers {1e6 * b0:.1f} -> {1e6 * b1:.1f} us ({100 * slow:+.1f}%)")
        if slow <= budget:
            return choice
        allowed *= 0.9 * budget / slow
        choice = pick(opts, n, allowed)
        if not any(choice.values()):
            return choice
    return {p: 0 for p in mods}


def tune_budget(model, budget: float, measure=measure_layer, k_chunks=K_CHUNKS, scope: str = "layer",
                chain=measure_chain) -> dict:
    """k per chunk per projection, tuned on the first layer and set on every layer; returns {projection: k_fraction}.
    scope "layer": the most channels with the layer's Linears together within budget (tune_layer); "linear": per
    projection the largest k whose slowdown of that Linear alone is <= budget (tune_module)."""
    mods = compensated_modules(model)
    if not mods:
        raise SpecqError("no compensated Linear to tune")
    if scope not in ("layer", "linear"):
        raise SpecqError(f"tune_budget: scope {scope!r} (layer or linear)")
    by = {proj: [m for nm, m in mods if nm.endswith(proj)] for proj in PROJ}
    by = {p: ms for p, ms in by.items() if ms}
    first = {p: ms[0] for p, ms in by.items()}
    if scope == "layer":
        n = min(CHAIN_LAYERS, min(len(ms) for ms in by.values()))
        ks = tune_layer(first, budget, measure, chain, k_chunks, layers=[{p: ms[i] for p, ms in by.items()}
                                                                           for i in range(n)])
    else:
        ks = {p: tune_module(cl, budget, measure, k_chunks) for p, cl in first.items()}
    chosen = {}
    for p, ms in by.items():
        for m in ms:
            m.set_k(ks[p])
        chosen[p] = ks[p] * ms[0].n_chunks / ms[0].in_features
    return chosen


def calib_for(tokenizer) -> torch.Tensor:
    """The calibration tokens of the approx selector's thresholds: 8 windows of 256 tokens of WikiText-2 valid."""
    from ..quant.calib import calib_tokens
    return calib_tokens(tokenizer, "wikitext2", n=8, seqlen=256, seed=1)


def attach(model, spec: str, fp, calib=None, tokenizer=None) -> dict:
    """Residuals (4-bit) and, for the approx selector, calibration statistics for every decoder WQLinear of a
    quantized model, k = 0 for now; the spec is recorded in model.quant_info["compensate"], so that save_quantized
    writes it with the residuals. fp: full-precision weights (see compensate_model); calib: LongTensor [n, L]
    tokens, else calib_for(tokenizer). Returns the parsed spec ({} when off)."""
    opts = parse_spec(spec)
    if not opts:
        return {}
    if fp is None:
        raise SpecqError("--compensate needs the full-precision weights: quantize with --format (w4a16, w3a16, "
                         "w2a16), or load a checkpoint saved by `specq quantize --compensate`")
    sel = opts["selector"]
    if sel == "approx" and calib is None:
        if tokenizer is None:
            raise SpecqError("--compensate with the approx selector needs calibration tokens or a tokenizer")
        calib = calib_for(tokenizer)
    compensate_model(model, fp, k_fraction=0.0, selector=sel, calib=calib)
    if isinstance(getattr(model, "quant_info", None), dict):
        model.quant_info["compensate"] = {"spec": spec.strip(), "selector": sel}
    return opts


def apply_compensation(model, spec: str | None, fp=None, calib=None, tokenizer=None, log=print):
    """Apply a --compensate spec to a quantized model (in place): residuals from fp (attach), then k per projection
    (k=: as given; budget=: tune_budget on the model's device). A model loaded from a checkpoint saved by `specq
    quantize --compensate` has its residuals already: spec None applies the saved spec, another spec sets k (or
    tunes) on them, "off" turns them off. Returns {projection: k_fraction} (empty when off)."""
    mods = compensated_modules(model)
    saved = (getattr(model, "quant_info", None) or {}).get("compensate") if mods else None
    if spec is None and saved:
        spec = saved["spec"]
    opts = parse_spec(spec)
    if not opts:
        for _, m in mods:
            m.set_k(0)
        return {}
    sel = opts["selector"]
    if not mods:
        attach(model, spec, fp, calib, tokenizer)
        mods = compensated_modules(model)
    elif sel == "approx" and any(m.stats is None for _, m in mods):
        raise SpecqError("this checkpoint's compensation was saved for selector=exact (no calibration statistics): "
                         "add ,selector=exact")
    for _, m in mods:
        m.set_k(0, selector=sel)
    if "budget" in opts:
        chosen = tune_budget(model, opts["budget"], scope=opts.get("scope", "layer"))
    else:
        chosen = {}
        for nm, m in mods:
            m.set_k(k_chunk_for(m.in_features, opts["k_fraction"]))
            chosen[nm.rsplit(".", 1)[-1]] = m.k_fraction
    if log:
        log("compensation: " + ", ".join(f"{p} k={f:.4f}" for p, f in chosen.items()) + f" ({sel} top-k)")
    return chosen
