"""QDEC overhead on the GPU: a decode step's four Linears (qkv, o, gate_up, down) at Llama-3-8B shapes,
random weights (timings do not depend on values), batch 1, bf16 activations.

    python bench/qdec_overhead.py --out $OUT/qdec_overhead.json

Bases, each timed alone and with QDEC: specq's W4A16 default (the CUDA few-token kernel at one token) and its
Triton GEMV (specq.kernels.w4a16_linear), torch's
int4 tinygemm (aten._weight_int4pack_mm, g128), and bf16 cuBLAS for scale; 3 bit only when a 3-bit GPU
kernel is registered with specq.quant.wq. Compensation: 4-bit residual rows read zero-copy from pinned host memory,
selection + fetch on a side stream, joined with one add (on specq's W4A16 base: no add, the fetch writes one
more split-K partial of the GEMV's launch; at one token on w4mma or the W3A16 kernel, the compensation kernel qdec1
runs just before the GEMV on the same stream, specq.compensate.mma). Both paths are CUDA graphs over --layers
distinct layers; x is refilled with fresh random activations before every replay (so the chosen rows
change), each replay timed with CUDA events; median per layer. Also checks the kernel against the
reference math before timing. --budget (default 5%): for each base with a one-token path, specq's tuner
(specq.compensate.tune) picks k per projection, each Linear held to the budget on its own (scope "linear") and the
layer's four Linears together (scope "layer", the --compensate default), and the chain is timed with each choice
("tuned" in the JSON).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specq.compensate import CompensatedLinear, Residual  # noqa: E402
from specq.compensate import kernel as KK  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 28672), "down_proj": (14336, 4096)}


class TinyGemm(nn.Module):
    """torch int4 weight-only GEMV (the gpt-fast / torchao kernel), random codes, group 128."""

    def __init__(self, K, N, dev, G=128):
        super().__init__()
        self.in_features, self.out_features, self.G = K, N, G
        q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
        self.w = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        sz = torch.empty(K // G, N, 2, dtype=torch.bfloat16, device=dev)
        sz[..., 0].uniform_(0.001, 0.01)
        sz[..., 1].uniform_(-0.01, 0.01)
        self.scales = sz

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm(x, self.w, self.G, self.scales)


class SpecqW4(nn.Module):
    """specq's W4A16 Triton kernel on random canonical int4 weights."""

    def __init__(self, K, N, dev, prepare, fn):
        super().__init__()
        self.in_features, self.out_features, self.fn = K, N, fn
        q = torch.randint(-2**31, 2**31 - 1, (N, K // 8), dtype=torch.int32, device=dev)
        self.scales = torch.empty(N, K // 128, dtype=torch.bfloat16, device=dev).uniform_(0.001, 0.01)
        self.w = prepare(q, self.scales, torch.full_like(self.scales, 8.0), 128, torch.bfloat16)

    def forward(self, x):
        return self.fn(x, self.w)

    def w4a16_for(self, dtype):      # CompensatedLinear's fused path (no add kernel) uses this weight
        return self.w if dtype == torch.bfloat16 else None


class BF16(nn.Module):
    def __init__(self, K, N, dev):
        super().__init__()
        self.in_features, self.out_features = K, N
        self.weight = torch.randn(N, K, dtype=torch.bfloat16, device=dev) * 0.02
        self.scales = self.weight[:1, :1]

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def wq_base(K, N, bits, dev):
    from specq.quant.wq import WQLinear
    m = WQLinear(K, N, bits, 128, True, dtype=torch.bfloat16, device=dev)
    m.qweight.random_(-2**31, 2**31 - 1)
    m.scales.uniform_(0.001, 0.01)
    return m


def rand_residual(K, N):
    codes = torch.randint(-2**31, 2**31 - 1, (K, N // 8), dtype=torch.int32).pin_memory()
    return Residual(codes=codes, scales=torch.rand(N) * 1e-3 + 1e-4)


def acts(M, K, ch, dev):
    return (torch.randn(M, K, device=dev) * ch).to(torch.bfloat16)


@torch.inference_mode()
def check(dev, log):
    """Kernel vs reference math on one layer shape; returns a dict of results."""
    K, N = 4096, 4096
    base = TinyGemm(K, N, dev)
    res = rand_residual(K, N)
    ch = torch.exp(torch.randn(K, device=dev))
    stats = SEL.calib_stats(acts(512, K, ch, dev).float().cpu())
    out = {}
    for sel in ("approx", "exact"):
        cl = CompensatedLinear(base, res, k_chunk=8, selector=sel, stats=stats)
        x = acts(4, K, ch, dev)
        y = cl(x).float()
        y0 = base(x).float()
        xc = x.float().cpu()
        idx = cl.select(xc) if sel == "approx" else SEL.exact_topk(xc, cl.k)
        ref = y0.cpu() + cl.correction(xc, idx)
        err = ((y.cpu() - ref).abs().max() / ref.abs().max()).item()
        kidx, _ = KK.select(cl, x)
        same = all(set(a.tolist()) == set(b.tolist()) for a, b in zip(kidx.long().cpu(), idx))
        rows = torch.cat([cl(x[i:i + 1]).float() for i in range(4)])
        out[sel] = dict(max_rel_err=err, select_matches_reference=same,
                        rows_equal_single=bool(torch.allclose(rows, y, atol=1e-2, rtol=1e-2)))
        log(f"check {sel}: {out[sel]}")
    from specq.kernels import prepare_w4a16, w4a16_linear
    cl = CompensatedLinear(SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear), res, k_chunk=8, selector="approx",
                           stats=stats)
    for M in (1, 4):
        x = acts(M, K, ch, dev)
        cl.use_fused = False
        y_side = cl(x).float()
        cl.use_fused = True
        y_fused = cl(x).float()
        err = ((y_fused - y_side).abs().max() / y_side.abs().max()).item()
        out[f"fused_vs_side_M{M}"] = dict(max_rel_err=err, locks_zero=int(cl.base.w.locks.abs().sum()) == 0)
        log(f"check fused (no add kernel) vs side path, M={M}: {out[f'fused_vs_side_M{M}']}")
    out.update(check_mma(dev, log))
    from specq.quant.wq import _KERNELS
    if (3, "rowpack") in _KERNELS:
        out.update(check_mma(dev, log, bits=3))
    hp = KK.mapped(res.codes)
    out["residual_on_host_pinned"] = bool(res.codes.device.type == "cpu" and res.codes.is_pinned())
    out["mapped_ptr_equals_host_ptr"] = hp.data_ptr() == res.codes.data_ptr()
    return out


@torch.inference_mode()
def check_mma(dev, log, bits=4):
    """One token on w4mma (bits 4) or the W3A16 kernel (bits 3) after qdec1 (specq.compensate.mma), every
    Llama-3-8B projection: qdec1's chunk partials against torch (the selection must match approx_topk exactly: a
    wrong channel moves its chunk's partial by O(1)), the output against base + reference correction, and a
    CUDA-graph replay (PDL launches on sm_90+) against eager."""
    from specq.compensate import mma
    from specq.kernels import prepare_w4a16, w4a16_linear
    out, tag = {}, "mma" if bits == 4 else "w3"
    for p, (K, N) in SHAPES.items():
        res = rand_residual(K, N)
        ch = torch.exp(torch.randn(K, device=dev))
        stats = SEL.calib_stats(acts(256, K, ch, dev).float().cpu())
        base = SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear) if bits == 4 else wq_base(K, N, 3, dev)
        for kc in (3, 5, 20):
            cl = CompensatedLinear(base, res, k_chunk=kc, selector="approx", stats=stats)
            x = acts(1, K, ch, dev)
            ok = (mma.usable(cl, x, cl.base.w.mma) if bits == 4
                  else mma.usable_qdec1(cl, x) and base.w3a16_for(x.dtype) is not None)
            if not ok:
                out[f"{tag}_{p}_kc{kc}"] = "not usable"
                continue
            ws = mma.partials(cl, x, False).cpu()
            ref = mma.partials_ref(cl, x)
            perr = ((ws - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
            y = cl(x).float().cpu()
            if bits == 4:                # in-grid compensation CTAs (the default where they fit) against qdec1 apart:
                ingrid = mma.INGRID      # the same partials summed in the same order, so the same bits
                mma.INGRID = False
                y_sep = cl(x).float().cpu()
                mma.INGRID = ingrid
                used = mma.ingrid_shape(N, K, cl.n_chunks, N // 8, torch.cuda.get_device_properties(dev)
                                        .multi_processor_count, kc) is not None
            xc = x.float().cpu()
            yref = cl.base(x).float().cpu() + cl.correction(xc, cl.select(xc))
            err = ((y - yref).abs().max() / yref.abs().max()).item()
            sg = torch.cuda.Stream()
            sg.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(sg):
                cl(x)
            torch.cuda.current_stream().wait_stream(sg)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                yg = cl(x)
            same = 0
            for _ in range(10):
                g.replay()
                torch.cuda.synchronize()
                same += bool(torch.equal(yg.float().cpu(), y))
            out[f"{tag}_{p}_kc{kc}"] = dict(partials_rel_err=perr, max_rel_err=err, graph_equal_eager=f"{same}/10",
                                            finite=bool(torch.isfinite(y).all()))
            if bits == 4:
                out[f"{tag}_{p}_kc{kc}"].update(ingrid=used and mma.INGRID, equal_to_separate=bool(torch.equal(y, y_sep)))
            log(f"check {'w4mma' if bits == 4 else 'W3A16'} + qdec1 {p} k_chunk={kc}: {out[f'{tag}_{p}_kc{kc}']}")
    return out


def layer_inputs(dev):
    """Per projection: heavy-tailed channel scales, calibration stats for the approx selector, and one flat
    activation buffer (xs_flat [1, sum K], viewed per projection as xs[p]) refilled from `pool` per replay."""
    chs = {p: torch.exp(torch.randn(K, device=dev)) for p, (K, N) in SHAPES.items()}
    stats = {p: SEL.calib_stats(acts(256, K, chs[p], dev).float().cpu()) for p, (K, N) in SHAPES.items()}
    xs_flat = torch.empty(1, sum(K for K, N in SHAPES.values()), dtype=torch.bfloat16, device=dev)
    xs, o = {}, 0
    for p, (K, N) in SHAPES.items():
        xs[p] = xs_flat[:, o:o + K]
        o += K
    pool = torch.cat([acts(64, K, chs[p], dev) for p, (K, N) in SHAPES.items()], 1)
    return stats, xs_flat, xs, pool


def w4_chain(dev, n_layers):
    """n_layers distinct Llama-3-8B layers of compensated specq-W4A16 Linears (k = 0 to start) on shared inputs ->
    (layers, step() running them all in order, set_k(k_fraction) for all, xs_flat, pool) for graph_time."""
    from specq.kernels import prepare_w4a16, w4a16_linear
    stats, xs_flat, xs, pool = layer_inputs(dev)
    layers = [{p: CompensatedLinear(SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear), rand_residual(K, N), k_chunk=0,
                                    selector="approx", stats=stats[p]) for p, (K, N) in SHAPES.items()}
              for _ in range(n_layers)]

    def step():
        for mods in layers:
            for p, cl in mods.items():
                cl(xs[p])

    def set_k(kf):
        for mods in layers:
            for cl in mods.values():
                cl.set_k(SEL.k_chunk_for(cl.in_features, kf))
    return layers, step, set_k, xs_flat, pool


def graph_time(fn, x, pool, reps):
    """Capture fn() into a CUDA graph; median seconds of a replay, x refilled from pool before each."""
    from specq.compensate.tune import graph_of
    g = graph_of(fn, warm=3)
    ts = []
    for i in range(reps + 10):
        x.copy_(pool[i % pool.shape[0]])
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        if i >= 10:
            ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def tuned(layers, step, xs_flat, pool, a, bits, base_name, log, scope="linear"):
    """specq.compensate.tune at --budget: k per projection from the tuner's own timing of the first layer's Linears
    (specq.compensate.tune.measure_layer: a CUDA graph of back-to-back calls of one Linear; scope "layer": then also
    the four Linears in a row, tune_layer), set on every layer; then the layer chain timed as the rows are, against
    the base in interleaved rounds."""
    from specq.compensate.tune import tune_layer, tune_module
    for mods in layers:                             # the one-token paths the rows time as "w4mma+qdec1" / "w3a16+qdec1"
        for cl in mods.values():
            cl.set_k(0, selector="approx")
            cl.use_fused = True
    kcs = (tune_layer(layers[0], a.budget, layers=layers, log=log) if scope == "layer" else
           {p: tune_module(layers[0][p], a.budget) for p in SHAPES})
    base_t, q_t = [], []
    for _ in range(3):
        for kc in (None, kcs):
            for mods in layers:
                for p, cl in mods.items():
                    cl.set_k(0 if kc is None else kc[p], selector="approx")
                    cl.use_fused = True
            (base_t if kc is None else q_t).append(graph_time(step, xs_flat, pool, a.reps) / a.layers)
    b, q = statistics.median(base_t), statistics.median(q_t)
    n_in = {p: layers[0][p].in_features for p in SHAPES}
    sel = sum(kcs[p] * layers[0][p].n_chunks for p in SHAPES)
    row = dict(bits=bits, base=base_name, budget=a.budget, scope=scope, k_chunk=kcs,
               k_fraction={p: round(kcs[p] * layers[0][p].n_chunks / n_in[p], 5) for p in SHAPES},
               k_fraction_layer=round(sel / sum(n_in.values()), 5), base_us=round(b, 2), qdec_us=round(q, 2),
               slowdown=round(q / b - 1, 4))
    log(f"[{base_name}] tuned to {100 * a.budget:.0f}% per {scope}: k per chunk {kcs}, {row['k_fraction_layer']} of the "
        f"layer's input channels; {q:.1f} us per layer against {b:.1f}, slowdown {100 * (q / b - 1):.2f}%")
    return row


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/h100/qdec_overhead.json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--k", default="0.0025,0.005,0.01,0.02")
    ap.add_argument("--budget", type=float, default=0.05,
                    help="also tune k per projection to this slowdown per Linear (specq.compensate.tune) and time "
                         "the chain with it (0: skip)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    try:
        import specq.kernels  # noqa: F401  (registers the W4A16 kernels when present)
    except Exception as e:  # pragma: no cover
        log(f"specq.kernels import failed: {e}")
    from specq.quant.wq import _KERNELS
    result = dict(shapes="Llama-3-8B (K, N): " + json.dumps(SHAPES), weights="random", tokens=1,
                  activations="bf16, heavy-tailed channel scales (exp(N(0,1)))", rows=[],
                  device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv))
    result["checks"] = check(dev, log)
    bases = []
    try:
        from specq.kernels import prepare_w4a16, w4a16_linear
        from functools import partial
        # w4a16_linear's default at one token is the CUDA few-token kernel (w4mma) where prepare_w4a16 built its
        # layout; with it the compensated Linear runs specq.compensate.mma (rows "w4mma+qdec1"); its "side+add" rows
        # keep the CUDA GEMV beside the side stream. The second base is the Triton GEMV (fused: one more partial).
        bases.append((4, "specq W4A16 default (CUDA w4mma at M <= 16, compensation by specq.compensate.mma), g128",
                      lambda K, N: SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear)))
        bases.append((4, "specq W4A16 Triton GEMV (specq.kernels.w4a16_linear, g128)",
                      lambda K, N: SpecqW4(K, N, dev, partial(prepare_w4a16, mma=False), w4a16_linear)))
    except Exception as e:
        log(f"specq W4A16 kernel unavailable: {e}")
    bases.append((4, "torch int4 tinygemm (aten._weight_int4pack_mm, g128)", lambda K, N: TinyGemm(K, N, dev)))
    if (3, "rowpack") in _KERNELS:
        bases.append((3, "specq W3A16 kernel", lambda K, N: wq_base(K, N, 3, dev)))
    else:
        log("3 bit: no GPU kernel registered, 4-bit rows only")
    bases.append((16, "bf16 cuBLAS (F.linear): reference scale only", lambda K, N: BF16(K, N, dev)))
    ks = [float(k) for k in a.k.split(",")]
    resid = [{p: rand_residual(K, N) for p, (K, N) in SHAPES.items()} for _ in range(a.layers)]
    stats, xs_flat, xs, pool = layer_inputs(dev)
    for bits, base_name, make in bases:
        try:
            layers = [{p: CompensatedLinear(make(K, N), resid[i][p], k_chunk=0, selector="approx", stats=stats[p])
                       for p, (K, N) in SHAPES.items()} for i in range(a.layers)]
            one = layers[0]["gate_up_proj"].base
            t1 = triton.testing.do_bench(lambda: one(xs["gate_up_proj"]), return_mode="median") * 1e3
            log(f"[{base_name}] gate_up GEMV alone (do_bench, no graph): {t1:.1f} us")

            def step():
                for mods in layers:
                    for p, cl in mods.items():
                        cl(xs[p])

            def set_all(kf, sel, fused=True):
                for mods in layers:
                    for cl in mods.values():
                        cl.set_k(SEL.k_chunk_for(cl.in_features, kf), selector=sel)
                        cl.use_fused = fused

            fusable = ((hasattr(one, "w4a16_for") and one.w4a16_for(torch.bfloat16) is not None)      # 4-bit CUDA bases
                       or (hasattr(one, "w3a16_for") and one.w3a16_for(torch.bfloat16) is not None))  # the W3A16 kernel
            runs = [(kf, "approx", True) for kf in ks] + [(0.005, "exact", True)]
            runs += [(kf, "approx", False) for kf in ks] if fusable else []
            base_t, q_t = [], {r: [] for r in runs}
            for _ in range(3):                       # interleaved rounds against drift
                set_all(0, "approx", True)
                base_t.append(graph_time(step, xs_flat, pool, a.reps) / a.layers)
                for r in runs:
                    set_all(*r)
                    q_t[r].append(graph_time(step, xs_flat, pool, a.reps) / a.layers)
            base_us = statistics.median(base_t)
            log(f"[{base_name}] base {base_us:.1f} us per layer")
            for (kf, sel, fused), v in q_t.items():
                q_us = statistics.median(v)
                mm = fused and sel == "approx" and getattr(getattr(one, "w", None), "mma", None) is not None
                w3 = fused and sel == "approx" and bits == 3
                path = ("w4mma+qdec1" if mm else "w3a16+qdec1" if w3 else "fused" if fused and bits == 4
                        else "side+add") if fusable else "side+add"
                result["rows"].append(dict(bits=bits, k_fraction=kf, selector=sel, base_us=round(base_us, 2),
                                           qdec_us=round(q_us, 2), slowdown=round(q_us / base_us - 1, 4), base=base_name,
                                           path=path))
                log(f"[{base_name}] k={kf} {sel} {path}: {q_us:.1f} us per layer, slowdown "
                    f"{100 * (q_us / base_us - 1):.2f}%")
            if fusable and a.budget > 0:
                for scope in ("linear", "layer"):
                    result.setdefault("tuned", []).append(tuned(layers, step, xs_flat, pool, a, bits, base_name, log,
                                                                scope))
            del layers
        except Exception as e:
            log(f"[{base_name}] failed: {type(e).__name__}: {e}")
    result["host_arg"] = KK.HOST_ARG
    result["log"] = lines
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()
