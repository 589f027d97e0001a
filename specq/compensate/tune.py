"""`--compensate` option: a fixed k fraction, or k per projection tuned to a slowdown budget.

    --compensate k=0.01                  every projection selects 1% of its input channels
    --compensate k=0.01,selector=exact   exact top-k instead of the approximate bucket top-k
    --compensate budget=5%               per projection (qkv, o, gate_up, down) the largest k whose
                                         measured slowdown of that Linear stays within 5%
Tuning times the first layer's Linears on the model's device, base alone vs compensated at growing k per chunk,
median of `reps` runs. On a GPU each run replays a CUDA graph of GRAPH_CALLS back-to-back calls, as decoding runs a
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

PROJ = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
K_CHUNKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GRAPH_CALLS = 16


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
            else:
                raise SpecqError(f"bad --compensate {spec!r}: unknown key {key!r} (k, budget, selector)")
        except ValueError:
            raise SpecqError(f"bad --compensate value {part!r} (k in (0, 1], budget like 5%, "
                             f"selector exact|approx)") from None
    if ("k_fraction" in out) == ("budget" in out):
        raise SpecqError(f"bad --compensate {spec!r}: give exactly one of k=... or budget=...")
    return out


def add_compensate_arg(parser):
    parser.add_argument("--compensate", default=None, metavar="SPEC",
                        help="dynamic error compensation of low-bit weights (QDEC): k=0.01 (fraction of input "
                             "channels), or budget=5%% (k per projection tuned to that slowdown on this device); "
                             "append ,selector=exact for exact top-k")
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
    """A CUDA graph of `calls` back-to-back calls of fn(), captured after `warm` eager calls on a side stream
    (compilation, and buffers that must exist before a capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def _time_graph(fn, reps: int, calls: int = GRAPH_CALLS) -> float:
    """Median seconds per call of fn() on the current CUDA device: graph_of(fn, calls) replayed reps times."""
    g = graph_of(fn, calls)
    ts = []
    for i in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        if i >= 2:
            ts.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(ts)


@torch.inference_mode()
def measure_layer(cl, k_chunk: int, reps: int = 20) -> float:
    """Seconds of one decode-step (1 token) call of CompensatedLinear cl at k_chunk (0 = base alone): on CUDA per
    call of a graph of GRAPH_CALLS calls, on the CPU the wall clock of one call."""
    dev = cl.base.scales.device if hasattr(cl.base, "scales") else torch.device("cpu")
    dtype = cl.base.scales.dtype if hasattr(cl.base, "scales") else torch.float32
    x = torch.randn(1, cl.in_features, device=dev, dtype=dtype)
    old = cl.k_chunk
    cl.set_k(k_chunk)
    try:
        if x.is_cuda:
            with torch.cuda.device(x.device):
                return _time_graph(lambda: cl(x), reps)
        return _time_fn(lambda: cl(x), torch.device(dev), reps)
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


def tune_budget(model, budget: float, measure=measure_layer, k_chunks=K_CHUNKS) -> dict:
    """Per projection, the largest k per chunk whose slowdown on the first layer is <= budget.
    Sets it on every layer; returns {projection: k_fraction}."""
    mods = compensated_modules(model)
    if not mods:
        raise SpecqError("no compensated Linear to tune")
    chosen = {}
    for proj in PROJ:
        ms = [m for nm, m in mods if nm.endswith(proj)]
        if not ms:
            continue
        best = tune_module(ms[0], budget, measure, k_chunks)
        for m in ms:
            m.set_k(best)
        chosen[proj] = best * ms[0].n_chunks / ms[0].in_features
    return chosen


def apply_compensation(model, spec: str | None, fp=None, calib=None, tokenizer=None, log=print):
    """Apply a --compensate spec to a quantized model (in place). fp: full-precision weights (see
    compensate_model); calib: LongTensor [n, L] tokens, else taken from WikiText-2 valid via tokenizer.
    Returns {projection: k_fraction} (empty when spec is off)."""
    opts = parse_spec(spec) if isinstance(spec, str) or spec is None else dict(spec)
    if not opts:
        return {}
    if fp is None:
        raise SpecqError("--compensate needs the full-precision weights (the unquantized model)")
    sel = opts["selector"]
    if sel == "approx" and calib is None:
        if tokenizer is None:
            raise SpecqError("--compensate with the approx selector needs calibration tokens or a tokenizer")
        from ..quant.calib import calib_tokens
        calib = calib_tokens(tokenizer, "wikitext2", n=8, seqlen=256, seed=1)
    k0 = opts.get("k_fraction", 1.0 / 1024)
    compensate_model(model, fp, k_fraction=k0, selector=sel, calib=calib)
    if "budget" in opts:
        chosen = tune_budget(model, opts["budget"])
    else:
        chosen = {}
        for nm, m in compensated_modules(model):
            chosen[nm.rsplit(".", 1)[-1]] = m.k_fraction
    if log:
        log("compensation: " + ", ".join(f"{p} k={f:.4f}" for p, f in chosen.items()) + f" ({sel} top-k)")
    return chosen
