"""Kernel benchmark: one decoder layer's four weight matmuls (qkv, o, gate_up, down) of Llama-3-8B and
Llama-3-70B, M tokens, specq W4A16 (g128) / W8A8 / W4A8 (per-channel, g128) vs torch int4 (tinygemm,
g128) vs bf16 cuBLAS, all in one run. Random non-zero weights made on the GPU (speed does not depend on
the values). Time = median over graph replays (each replay runs the layer `REPS` times) / REPS.

python bench/kernels.py [--out DIR] [--sweep] [--no-check]
Writes DIR/kernels.json (rows [{model, M, format, specq_us, torch_int4_us, bf16_us}], command, device,
date) and DIR/kernels.png; runs bench/check_kernels.py's checks first (the benchmark stops on a failure).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.check_kernels import MODELS, check                     # noqa: E402
from specq.kernels import ref                                     # noqa: E402
from specq.kernels.int8 import _launch_i8, prepare_w4a8, prepare_w8a8, quantize_act, w4a8_linear, w8a8_linear  # noqa: E402
from specq.kernels.w3a16 import pack3, prepare_w3a16, w3a16_linear  # noqa: E402
from specq.kernels.w4a16 import prepare_w4a16, w4a16_linear  # noqa: E402

MS = [1, 2, 4, 8, 16, 32, 64, 128]
REPS = 10


def graph_time(fns, reps=REPS, iters=25):
    """Median microseconds of one pass over fns (zero-arg callables), timed as CUDA-graph replays."""
    for f in fns:
        f()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(reps):
            for f in fns:
                f()
    gr.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / reps)
    del gr
    return statistics.median(ts)


def make_weights(shapes, dev):
    """Per layer matmul: every format's prepared weight (random, non-zero)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for name, K, N in shapes:
        d = {"name": name, "K": K, "N": N}
        d["bf16"] = (torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02)
        q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, dev, g)
        d["w4a16"] = prepare_w4a16(q, s, z, 128)
        d["w4a16_raw"] = (q, s, z)
        d["w4a16p"] = prepare_w4a16(q, s, z, 128, slices=False)
        w8, sw = ref.random_w8a8(N, K, dev, g)
        d["w8a8"] = prepare_w8a8(w8, sw)
        q4, sw4, _ = ref.random_w4a8(N, K, False, dev, g)
        d["w4a8"] = prepare_w4a8(q4, sw4, None)
        gs = torch.randint(1, 17, (N, K // 128), device=dev, dtype=torch.int32)
        d["w4a8-g128"] = prepare_w4a8(q4, sw4, gs)
        q3 = torch.randint(0, 8, (N, K), device=dev, dtype=torch.uint8)
        s3 = (torch.rand(N, K // 128, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
        d["w3a16"] = prepare_w3a16(pack3(q3), s3, torch.full_like(s3, 4.0), 128, K)
        try:
            wu8 = torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8)
            d["int4pack"] = torch.ops.aten._convert_weight_to_int4pack(wu8, 8)
            d["int4sz"] = (torch.rand(K // 128, N, 2, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
        except Exception as e:  # noqa: BLE001 - peer missing on this torch: recorded as None
            print("torch int4 unavailable:", repr(e)[:200])
            d["int4pack"] = None
        out.append(d)
    return out


def layer_fns(ws, fmt, x_by_k, cfg=None):
    fns = []
    for d in ws:
        x = x_by_k[d["K"]]
        if fmt == "bf16":
            fns.append(lambda x=x, w=d["bf16"]: torch.nn.functional.linear(x, w))
        elif fmt == "torch_int4":
            if d["int4pack"] is None:
                return None
            fns.append(lambda x=x, w=d["int4pack"], sz=d["int4sz"]: torch.ops.aten._weight_int4pack_mm(x, w, 128, sz))
        elif fmt == "w4a16":
            fns.append(lambda x=x, w=d["w4a16"]: w4a16_linear(x, w, cfg=cfg))
        elif fmt == "w8a8":
            fns.append(lambda x=x, w=d["w8a8"]: w8a8_linear(x, w, cfg=cfg))
        elif fmt == "w3a16":
            fns.append(lambda x=x, w=d["w3a16"]: w3a16_linear(x, w))
        else:
            fns.append(lambda x=x, w=d[fmt]: w4a8_linear(x, w, cfg=cfg))
    return fns


def w4a16_candidates(m):
    """(slices, (BM, BN, SPLIT, R, warps, stages, PRESCALE)) configs to sweep for m tokens."""
    BM = 16 if m <= 16 else 32 if m <= 32 else 64
    out = []
    if m <= 16:
        for sp in (2, 4, 8):
            for r in (1, 2, 4):
                out += [(True, (BM, 64, sp, r, 4, 2, False))]
            for r in (1, 2):
                out += [(True, (BM, 64, sp, r, 4, 2, True)), (True, (BM, 64, sp, r, 2, 2, False)),
                        (True, (BM, 32, sp, r, 2, 2, False)), (True, (BM, 64, sp, r, 4, 3, False))]
    else:
        for sp in ((1, 2, 4, 8) if m <= 32 else (1, 2, 4)):
            for r in (1, 2):
                for pre in (False, True):
                    out += [(True, (BM, 64, sp, r, 4, 3, pre)), (True, (BM, 128, sp, r, 8, 3, pre))]
                out += [(True, (BM, 64, sp, r, 2, 3, False))]
    return out


SWEEP_MS = [1, 16, 32, 64, 128]


def precompile(part, nparts, dev="cuda"):
    """Compile (by running once on tiny data) every sweep config with index % nparts == part."""
    g = torch.Generator().manual_seed(0)
    q, s, z = ref.random_w4a16(256, 1024, 128, False, torch.bfloat16, dev, g)
    wl = {sl: prepare_w4a16(q, s, z, 128, slices=sl) for sl in (True, False)}
    seen, i = set(), 0
    for m in SWEEP_MS:
        for sl, c in w4a16_candidates(m):
            w = wl[sl]
            key = (sl, c[0], c[1], c[2] > 1, c[3], c[4], c[5], c[6])
            if key in seen:
                continue
            seen.add(key)
            if i % nparts == part:
                x = torch.randn(m, 1024, device=dev, dtype=torch.bfloat16)
                w4a16_linear(x, w, cfg=c)
            i += 1
    torch.cuda.synchronize()


def sweep(ws, dev, log, ms=SWEEP_MS):
    """Per matmul shape and M: time every candidate config alone (graph); check it once against the
    reference; log the best few. Returns {(m, name): [(us, cfg), ...]} sorted."""
    import subprocess
    n = 12
    procs = [subprocess.Popen([sys.executable, __file__, "--precompile", f"{i}/{n}"]) for i in range(n)]
    for p in procs:
        p.wait()
    best = {}
    for m in ms:
        for d in ws:
            x = torch.randn(m, d["K"], device=dev, dtype=torch.bfloat16)
            q, s, z = d["w4a16_raw"]
            r = (x.float() @ ref.dequant_w4(q, s, z).T)
            res = []
            for sl, c in w4a16_candidates(m):
                dd = d if sl else dict(d, w4a16=d["w4a16p"])
                try:
                    y = w4a16_linear(x, dd["w4a16"], cfg=c)
                    e = ((y.float() - r).norm() / r.norm()).item()
                    if not e <= 1e-2:
                        log(f"sweep M={m} {d['name']} {'S' if sl else 'P'}{c}: BAD rel err {e:.2e}")
                        continue
                    t = graph_time(layer_fns([dd], "w4a16", {d["K"]: x}, cfg=c), reps=20, iters=10)
                except Exception as ex:  # noqa: BLE001 - a config that fails to compile is skipped
                    log(f"sweep M={m} {d['name']} {'S' if sl else 'P'}{c}: FAILED {repr(ex)[:200]}")
                    continue
                res.append((t, ("S" if sl else "P",) + c))
            res.sort()
            best[(m, d["name"])] = res
            ti = graph_time(layer_fns([d], "torch_int4", {d["K"]: x}), reps=20, iters=10) if d["int4pack"] is not None else float("nan")
            bf = graph_time(layer_fns([d], "bf16", {d["K"]: x}), reps=20, iters=10)
            gb = d["N"] * d["K"] / 2 / 1e3
            log(f"sweep M={m:<3d} {d['name']:7s} t_int4={ti:6.1f} bf16={bf:6.1f} | " + "  ".join(
                f"{c}={t:.1f}({gb / t:.0f}GB/s)" for t, c in res[:6]))
            for lay in "SP":
                rl = [(t, c) for t, c in res if c[0] == lay]
                if rl:
                    log(f"    best {lay}: {rl[0][1]}={rl[0][0]:.1f}")
        tot = sum(best[(m, d["name"])][0][0] for d in ws if best[(m, d["name"])])
        log(f"sweep M={m:<3d} layer sum of best = {tot:.1f} us")
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/h100")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--precompile", default=None, help="i/n: compile sweep configs (worker of --sweep)")
    ap.add_argument("--sweep-only", action="store_true", help="with --sweep: stop after the sweep")
    a = ap.parse_args()
    if a.precompile:
        i, n = map(int, a.precompile.split("/"))
        precompile(i, n)
        return
    os.makedirs(a.out, exist_ok=True)
    logf = open(os.path.join(a.out, "kernels_log.txt"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    dev = "cuda"
    torch.manual_seed(0)
    if not a.no_check:
        fails, _ = check(quick=False, out=log)
        if fails:
            log("kernel check failed: not benchmarking")
            sys.exit(1)
    models = a.models.split(",")
    rows = []
    fmts = ["w4a16", "w8a8", "w4a8", "w4a8-g128", "w3a16"]   # w4a8: per output channel (the format name)
    for model in models:
        ws = make_weights(MODELS[model], dev)
        if a.sweep and model == "llama3-8b":
            sweep(ws, dev, log)
            if a.sweep_only:
                return
        for m in MS:
            x_by_k = {d["K"]: torch.randn(m, d["K"], device=dev, dtype=torch.bfloat16) for d in ws}
            bf = graph_time(layer_fns(ws, "bf16", x_by_k))
            fi = layer_fns(ws, "torch_int4", x_by_k)
            ti = graph_time(fi) if fi else None
            for fmt in fmts:
                t = graph_time(layer_fns(ws, fmt, x_by_k))
                rows.append({"model": model, "M": m, "format": fmt, "specq_us": round(t, 2),
                             "torch_int4_us": None if ti is None else round(ti, 2), "bf16_us": round(bf, 2)})
            log(f"{model} M={m:<3d} " + " ".join(f"{r['format']}={r['specq_us']:.1f}" for r in rows[-len(fmts):])
                + f" torch_int4={ti if ti is None else round(ti, 1)} bf16={bf:.1f}")
        del ws
        torch.cuda.empty_cache()
    res = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "what": "one decoder layer's qkv+o+gate_up+down matmuls, median us per layer (CUDA-graph replays), "
                   "random weights", "rows": rows}
    import triton
    res["triton"] = triton.__version__
    with open(os.path.join(a.out, "kernels.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(a.out, "kernels.png"))
    log(table(rows))


def table(rows):
    lines = [f"{'model':11s} {'M':>4s} {'w4a16':>7s} {'w8a8':>7s} {'w4a8':>7s} {'w4a8g':>7s} {'w3a16':>7s} {'t_int4':>7s} {'bf16':>7s}"]
    keys = sorted({(r["model"], r["M"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for mdl, m in keys:
        rs = {r["format"]: r for r in rows if r["model"] == mdl and r["M"] == m}
        any_r = next(iter(rs.values()))
        ti = any_r["torch_int4_us"]
        lines.append(f"{mdl:11s} {m:4d} " + " ".join(f"{rs[f]['specq_us']:7.1f}" for f in ["w4a16", "w8a8", "w4a8", "w4a8-g128", "w3a16"]
                                                        if f in rs)
                     + f" {ti if ti is not None else float('nan'):7.1f} {any_r['bf16_us']:7.1f}")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    models = sorted({r["model"] for r in rows})
    fig, axs = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, mdl in zip(axs[0], models):
        rs = [r for r in rows if r["model"] == mdl]
        ms = sorted({r["M"] for r in rs})
        for fmt in [f for f in ["w4a16", "w8a8", "w4a8", "w4a8-g128", "w3a16"] if any(r["format"] == f for r in rs)]:
            ax.plot(ms, [next(r["specq_us"] for r in rs if r["M"] == m and r["format"] == fmt) for m in ms], "o-", label=f"specq {fmt}")
        ti = [next(r["torch_int4_us"] for r in rs if r["M"] == m) for m in ms]
        if all(t is not None for t in ti):
            ax.plot(ms, ti, "s--", label="torch int4 (tinygemm g128)")
        ax.plot(ms, [next(r["bf16_us"] for r in rs if r["M"] == m) for m in ms], "k^--", label="bf16 cuBLAS")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("us per layer (qkv+o+gate_up+down)")
        ax.set_title(f"{mdl} (random weights), {res['device']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
