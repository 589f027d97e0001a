"""Dev sweep (GPU): the CUDA-core W4A16 GEMV (specq/kernels/w4gemv.py) on Llama-3-8B's four layer
matmuls at M = 1, 2, 4, 8, against the tensor-core kernel (w4a16_linear, default config) and torch's
tinygemm int4 (_weight_int4pack_mm), all g128 bf16, random non-zero weights made on the GPU.

    PYTHONPATH=$PWD python bench/dev/gemv_sweep.py [--time-limit 360] [--out gemv_sweep.json]
    python bench/dev/gemv_sweep.py --dry        # CPU: print the config lists, time nothing

Per (shape, M): phase 1 times (block_n, warps) x 3 splits (asm on, workspace reduction, 1 stage,
flat layout) plus the default config; phase 2 times the 4 best with asm off / atomic reduction /
panel512 layout / 2 stages. Every config is first checked against ref (relative error <= 1e-2; the
failures are printed and skipped). Time = CUDA-graph replays of 20 back-to-back calls, median / 20.
Configs are compiled beforehand by parallel worker processes (Triton's disk cache). Then: layer
totals (sum of the four best) and the whole layer (best configs, 10 layer passes in one graph).
The clock is checked between configs: past --time-limit minus a reserve the sweep stops and the
results so far are still reported. Writes --out (JSON) with the best config per (shape, M).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
from bench.check_kernels import MODELS                                    # noqa: E402
from specq.kernels import ref                                            # noqa: E402
from specq.kernels.w4gemv import (GemvConfig, _split_ok, default_gemv_config, gemv_linear,  # noqa: E402
                                  prepare_gemv, resolve_config)

MS = (1, 2, 4, 8)
G = 128
SMS = 132
PAIRS = ((64, 1), (64, 2), (128, 2), (128, 4), (256, 2), (256, 4), (256, 8), (512, 4))   # (block_n, warps)
TARGETS = (SMS * 2, SMS * 4, SMS * 8)                                    # programs in the grid
TOL = 1e-2
RESERVE_S = 60                                                           # for baselines + layer graphs


# ---------------------------------------------------------------- config lists (CPU, no GPU needed)

def splits_for(N, K, bn):
    """Up to 3 valid splits whose grid is nearest to TARGETS programs."""
    tiles = -(-N // bn)
    ok = [s for s in range(1, 129) if _split_ok(K, G, G, s)]
    out = []
    for t in TARGETS:
        s = min(ok, key=lambda s: abs(tiles * s - t))
        if s not in out:
            out.append(s)
    return out


def phase1(N, K, M):
    """[(cfg, asm, layout)]: (block_n, warps) x splits, asm on, workspace, 1 stage, flat; + default."""
    out = [(GemvConfig(*default_gemv_config(M, N, K, G)), True, "flat")]
    for bn, nw in PAIRS:
        for s in splits_for(N, K, bn):
            c = (GemvConfig(bn, G, s, nw, 1, False), True, "flat")
            if c not in out:
                out.append(c)
    return out


def phase2(best):
    """Variants of the best phase-1 entries: asm off, atomic reduction, panel512 layout, 2 stages."""
    out = []
    for c, asm, lay in best:
        for v in ((c, not asm, lay), (c._replace(atomic=not c.atomic), asm, lay), (c, asm, "panel512"),
                  (c._replace(num_stages=2), asm, lay)):
            if v not in out and v not in best:
                out.append(v)
    return out


def compile_key(N, K, M, cfg, asm):
    """What Triton compiles separately: (MP, block_n, warps, stages, asm, atomic, splitk, grouped)."""
    class W:  # resolve_config needs only these fields
        pass
    w = W()
    w.N, w.K, w.group_size, w.panel = N, K, G, N
    bn, bk, split, nw, ns, atomic, qk, u, grouped = resolve_config(M, w, cfg)
    mp = 1 << max(0, (M - 1).bit_length())
    return (mp, bn, nw, ns, bool(asm), bool(atomic) and split > 1, split > 1, bool(grouped))


def fmt_cfg(cfg, asm, lay):
    c = GemvConfig(*cfg)
    return (f"bn{c.block_n} s{c.split} w{c.num_warps} st{c.num_stages} {'atom' if c.atomic else 'ws'} "
            f"{'asm' if asm else 'tl'} {lay}")


# ---------------------------------------------------------------- precompile workers

def precompile(keys, dev="cuda"):
    """Compile each key by one call on a small weight (N = K = 1024, g128) with the same specializations."""
    g = torch.Generator().manual_seed(0)
    q, s, z = ref.random_w4a16(1024, 1024, G, False, torch.bfloat16, dev, g)
    w = prepare_gemv(q, s, z, G, torch.bfloat16)
    for mp, bn, nw, ns, asm, atomic, splitk, grouped in keys:
        split = 1 if not splitk else (2 if grouped else 8)   # K = 1024: 512 k (4 groups) or 128 k (1)
        if not splitk and not grouped:
            continue
        x = torch.randn(mp, 1024, device=dev, dtype=torch.bfloat16)
        try:
            gemv_linear(x, w, cfg=GemvConfig(bn, G, split, nw, ns, atomic), asm=asm)
        except Exception as e:  # noqa: BLE001 - reported; the sweep skips it later
            print("precompile failed", (mp, bn, nw, ns, asm, atomic, splitk, grouped), repr(e)[:300], flush=True)
    torch.cuda.synchronize()


def precompile_parallel(keys, workers):
    keys = sorted(set(keys))
    if not keys:
        return
    t0 = time.time()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gemv_keys_{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(keys, f)
    n = max(1, min(workers, len(keys)))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--precompile", f"{i}/{n}", path])
             for i in range(n)]
    for p in procs:
        p.wait()
    print(f"precompiled {len(keys)} kernels with {n} workers in {time.time() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------- GPU helpers

def graph_time(fns, reps=20, iters=20):
    """Median microseconds of one pass over fns, CUDA-graph replays of `reps` passes (bench/kernels.py)."""
    from bench.kernels import graph_time as gt
    return gt(fns, reps=reps, iters=iters)


def make_weights(dev):
    """Per shape: canonical g128 weight (asym zeros), its kernel layouts, the two baselines' weights."""
    from specq.kernels.w4a16 import prepare_w4a16
    ws = []
    for name, K, N in MODELS["llama3-8b"]:
        qi = torch.randint(0, 16, (N, K), device=dev, dtype=torch.int32)
        q = ref.pack_int4(qi)
        del qi
        s = (torch.rand(N, K // G, device=dev) * 0.02 + 0.002).to(torch.bfloat16)
        z = torch.randint(0, 16, (N, K // G), device=dev).to(torch.bfloat16)
        d = {"name": name, "N": N, "K": K, "raw": (q, s, z), "W": ref.dequant_w4(q, s, z),
             "flat": prepare_gemv(q, s, z, G, torch.bfloat16, "flat"),
             "panel512": prepare_gemv(q, s, z, G, torch.bfloat16, "panel512"),
             "w4a16": prepare_w4a16(q, s, z, G, torch.bfloat16)}
        try:
            wu8 = torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8)
            d["int4"] = torch.ops.aten._convert_weight_to_int4pack(wu8, 8)
            d["int4sz"] = (torch.rand(K // G, N, 2, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
        except Exception as e:  # noqa: BLE001
            print("torch int4 unavailable:", repr(e)[:200])
            d["int4"] = None
        ws.append(d)
    return ws


def gemv_fn(d, x, cfg, asm, lay):
    return lambda: gemv_linear(x, d[lay], cfg=cfg, asm=asm)


def rel(y, r):
    return ((y.float() - r).norm() / r.norm()).item()


def run_configs(d, x, r, cands, log, deadline, fails):
    """Check then time each candidate; returns [(us, cfg, asm, layout)]."""
    res = []
    for cfg, asm, lay in cands:
        if time.time() > deadline:
            log(f"  time limit: {len(cands) - len(res)} configs left untimed")
            break
        tag = f"{d['name']} M={x.shape[0]} {fmt_cfg(cfg, asm, lay)}"
        try:
            e = rel(gemv_fn(d, x, cfg, asm, lay)(), r)
            if not e <= TOL:
                fails.append(f"{tag}: rel err {e:.2e}")
                log(f"  FAIL {tag}: rel err {e:.2e}")
                continue
            t = graph_time([gemv_fn(d, x, cfg, asm, lay)])
        except Exception as ex:  # noqa: BLE001 - a config that fails to compile / launch is skipped
            fails.append(f"{tag}: {repr(ex)[:200]}")
            log(f"  FAIL {tag}: {repr(ex)[:200]}")
            continue
        res.append((t, cfg, asm, lay))
    res.sort(key=lambda e: e[0])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemv_sweep.json")
    ap.add_argument("--time-limit", type=float, default=360.0, help="seconds for the whole run")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--dry", action="store_true", help="print the config lists only (no GPU)")
    ap.add_argument("--precompile", nargs=2, metavar=("I/N", "KEYS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.precompile:
        i, n = map(int, a.precompile[0].split("/"))
        with open(a.precompile[1]) as f:
            keys = [tuple(k) for k in json.load(f)]
        precompile(keys[i::n])
        return
    t_start = time.time()
    ms = [int(m) for m in a.ms.split(",")]
    shapes = MODELS["llama3-8b"]
    if a.dry:
        keys = set()
        for m in ms:
            for name, K, N in shapes:
                c1 = phase1(N, K, m)
                keys |= {compile_key(N, K, m, c, asm) for c, asm, _ in c1}
                print(f"M={m} {name:7s} N={N:5d} K={K:5d}: {len(c1)} phase-1 configs (+ up to 16 phase-2): "
                      + "; ".join(fmt_cfg(*c) for c in c1))
            print(f"phase-2 example (variants of the first 4): " + "; ".join(fmt_cfg(*c) for c in phase2(c1[:4])))
        print(f"{len(keys)} phase-1 kernels to compile")
        return
    deadline = t_start + a.time_limit - RESERVE_S
    dev = "cuda"
    torch.manual_seed(0)
    logs = []

    def log(s):
        print(s, flush=True)
        logs.append(s)

    from specq.kernels.w4a16 import w4a16_linear
    keys = {compile_key(N, K, m, c, asm) for m in ms for _, K, N in shapes for c, asm, _ in phase1(N, K, m)}
    precompile_parallel(keys, a.workers)
    ws = make_weights(dev)
    log(f"weights ready at {time.time() - t_start:.0f} s; device {torch.cuda.get_device_name()}")
    fails, results, xs = [], {}, {}
    for m in ms:
        tops = {}
        for d in ws:                      # phase 1, every shape
            x = torch.randn(m, d["K"], device=dev, dtype=torch.bfloat16)
            xs[(m, d["name"])] = x
            r = x.float() @ d["W"].T
            res = run_configs(d, x, r, phase1(d["N"], d["K"], m), log, deadline, fails)
            if not res:                   # e.g. the inline PTX does not build: the plain path instead
                res = run_configs(d, x, r, [(c, False, lay) for c, _, lay in phase1(d["N"], d["K"], m)],
                                  log, deadline, fails)
            results[(m, d["name"])] = res
            tops[d["name"]] = phase2([(c, asm, lay) for _, c, asm, lay in res[:4]])
        if time.time() < deadline:
            precompile_parallel({compile_key(d["N"], d["K"], m, c, asm) for d in ws for c, asm, _ in tops[d["name"]]},
                                a.workers)
        for d in ws:                      # phase 2, every shape
            x = xs[(m, d["name"])]
            r = x.float() @ d["W"].T
            res = results[(m, d["name"])] + run_configs(d, x, r, tops[d["name"]], log, deadline, fails)
            res.sort(key=lambda e: e[0])
            results[(m, d["name"])] = res
            gb = d["N"] * d["K"] / 2 / 1e3
            log(f"M={m} {d['name']:7s} {len(res)} configs; best 5: " + " | ".join(
                f"{fmt_cfg(c, asm, lay)} {t:.1f}us {gb / t:.0f}GB/s" for t, c, asm, lay in res[:5]))
    # baselines, per shape and M (always run, even past the deadline)
    base = {}
    for m in ms:
        for d in ws:
            x = xs[(m, d["name"])]
            tw = graph_time([lambda x=x, w=d["w4a16"]: w4a16_linear(x, w)])
            ti = (graph_time([lambda x=x, w=d["int4"], sz=d["int4sz"]: torch.ops.aten._weight_int4pack_mm(x, w, G, sz)])
                  if d["int4"] is not None else float("nan"))
            base[(m, d["name"])] = (tw, ti)
    # table + layer totals + one-graph layer timing
    out = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "what": "Llama-3-8B layer matmuls, g128 bf16, us per call (CUDA-graph replays); GB/s = int4 bytes / time",
           "shapes": {}, "layer": {}, "failures": fails}
    import triton
    out["triton"] = triton.__version__
    log("")
    log(f"{'M':>2s} {'shape':7s} {'gemv best':>9s} {'GB/s':>5s} {'w4a16':>7s} {'int4':>7s}  best config")
    for m in ms:
        sums = [0.0, 0.0, 0.0]
        fns = {"gemv": [], "w4a16": [], "torch_int4": []}
        for d in ws:
            res = results.get((m, d["name"])) or []
            tw, ti = base[(m, d["name"])]
            gb = d["N"] * d["K"] / 2 / 1e3
            x = xs[(m, d["name"])]
            if res:
                t, c, asm, lay = res[0]
                sums[0] += t
                fns["gemv"].append(gemv_fn(d, x, c, asm, lay))
                log(f"{m:2d} {d['name']:7s} {t:9.1f} {gb / t:5.0f} {tw:7.1f} {ti:7.1f}  {fmt_cfg(c, asm, lay)}")
            else:
                sums[0] = float("nan")
                log(f"{m:2d} {d['name']:7s} {'-':>9s} {'':5s} {tw:7.1f} {ti:7.1f}  (not swept)")
            sums[1] += tw
            sums[2] += ti
            fns["w4a16"].append(lambda x=x, w=d["w4a16"]: w4a16_linear(x, w))
            if d["int4"] is not None:
                fns["torch_int4"].append(lambda x=x, w=d["int4"], sz=d["int4sz"]: torch.ops.aten._weight_int4pack_mm(x, w, G, sz))
            out["shapes"].setdefault(d["name"], {})[str(m)] = {
                "N": d["N"], "K": d["K"], "w4a16_us": round(tw, 2), "torch_int4_us": round(ti, 2),
                "best": None if not res else {"us": round(res[0][0], 2), "gbs": round(gb / res[0][0], 1),
                                              "cfg": res[0][1]._asdict(), "asm": res[0][2], "layout": res[0][3]},
                "configs": [{"us": round(t, 2), "gbs": round(gb / t, 1), "cfg": c._asdict(), "asm": asm, "layout": lay}
                            for t, c, asm, lay in res]}
        lay_t = {k: (graph_time(v, reps=10) if len(v) == len(ws) else float("nan")) for k, v in fns.items()}
        out["layer"][str(m)] = {"sum_best_gemv_us": round(sums[0], 2), "sum_w4a16_us": round(sums[1], 2),
                                "sum_torch_int4_us": round(sums[2], 2),
                                "graph_gemv_us": round(lay_t["gemv"], 2), "graph_w4a16_us": round(lay_t["w4a16"], 2),
                                "graph_torch_int4_us": round(lay_t["torch_int4"], 2)}
        log(f"M={m} layer: sum of best gemv {sums[0]:.1f} us, w4a16 {sums[1]:.1f}, torch int4 {sums[2]:.1f} | "
            f"one graph (10 layers / replay): gemv {lay_t['gemv']:.1f}, w4a16 {lay_t['w4a16']:.1f}, "
            f"torch int4 {lay_t['torch_int4']:.1f}")
    if fails:
        log(f"{len(fails)} failing configs (skipped): " + "; ".join(fails[:20]))
    out["log"] = logs
    out["runtime_s"] = round(time.time() - t_start, 1)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {a.out} after {out['runtime_s']} s")


if __name__ == "__main__":
    main()
