"""A/B of the wgmma W4A16 kernel (specq/kernels/w4wg.py, 17..64 tokens) against the Triton kernel (the default at
M > 16) and torch int4, one GPU, one run: every variant checked against the reference first (rel err <= 1e-2, two
launches bit-equal), then timed per matmul and as the whole Llama-3-8B layer (4 matmuls) in CUDA-graph replays
(bench/kernels.graph_time). On a failed check: a raw-accumulator dump of one small CTA tells which (row, token)
each register holds.
PYTHONPATH=$PWD MS=64,32 VARIANTS=d,p8 python bench/dev/wg_ab.py [llama3-8b] [llama3-70b]"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time  # noqa: E402
from specq.errors import SpecqError  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4a16 as W  # noqa: E402
import importlib  # noqa: E402
V = importlib.import_module(os.environ.get("MOD", "specq.kernels.w4wg"))   # MOD: an older copy of the kernel, for A/B

C = V.WgCfg
VARIANTS = {                                       # the per-shape defaults of w4wg.default_config, and others
    "wide": dict(WG=1, RT=2, MINB=2),                  # gate_up-like (N >= 4 K)
    "longk": dict(WG=1, RT=2, MINB=2, TARGET=264),     # down-like (K >= 3 N)
    "small": dict(WG=1, MINB=4, TARGET=264),           # qkv, o
    "smalls3": dict(WG=1, MINB=4, TARGET=264, S=3),
    "d": dict(),
    "p8": dict(P=8),
    "t264": dict(TARGET=264),
    # 256 rows per CTA (one x tile feeds 4 row blocks: half the x traffic from L2 of the 2-block CTAs), 1 CTA per SM
    "wg4": dict(WG=4, RT=1, MINB=1),
    "wg4t96": dict(WG=4, RT=1, MINB=1, TARGET=96),
    "wg4s6": dict(WG=4, RT=1, MINB=1, S=6),
    "wg4s6t96": dict(WG=4, RT=1, MINB=1, S=6, TARGET=96),
    "wg2rt2": dict(WG=2, RT=2, MINB=1),
    # split-K reduced inside a thread block cluster (DSMEM) instead of global partials + last-CTA counter
    "smallcl": dict(WG=1, MINB=4, TARGET=264, CL=1),
    "smallclt132": dict(WG=1, MINB=4, TARGET=132, CL=1),
    "smallcl8": dict(WG=1, MINB=4, SPLIT=8, CL=1),
    "longkcl": dict(WG=1, RT=2, MINB=2, TARGET=264, CL=1),
    "widecl2": dict(WG=1, RT=2, MINB=2, SPLIT=2, CL=1),
    # 3 x stages (49 KB of shared memory): 4 CTAs per SM
    "smalls3s1": dict(WG=1, MINB=4, S=3, SPLIT=1),
    "smallcls3": dict(WG=1, MINB=4, S=3, TARGET=264, CL=1),
    "smallcls3t528": dict(WG=1, MINB=4, S=3, TARGET=528, CL=1),
    "smallcl2s3": dict(WG=1, MINB=4, S=3, SPLIT=2, CL=1),
    "smallcl4s3": dict(WG=1, MINB=4, S=3, SPLIT=4, CL=1),
    "wg2rt2s1": dict(WG=2, RT=2, MINB=1, SPLIT=1),
    "wideks4": dict(WG=1, RT=2, MINB=2, S=3, KS=4),
}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: VARIANTS[k] for k in os.environ["VARIANTS"].split(",")}
VARIANTS = {k: C(**kw) for k, kw in VARIANTS.items()}


def diagnose(dtype=torch.bfloat16):
    """Raw accumulators of one CTA (N = 128, K = 128, 64 tokens) against the reference product."""
    g = torch.Generator().manual_seed(3)
    N, K, M = 128, 128, 64
    q, s, z = ref.random_w4a16(N, K, 128, True, dtype, "cuda", g)
    w = V.prepare_wg(q, s, z, 128)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    r = (x.float() @ ref.dequant_w4(q, s, z).float().T).cpu()             # [M, N]
    d = V.w4wg_linear(x, w, C(SPLIT=1), dump=True).view(256, 32).cpu()
    hits, shown = 0, 0
    for th in range(256):
        warp, lane = th // 32, th % 32
        gq, t = lane // 4, lane % 4
        for reg in range(32):
            n, c = reg // 4, reg % 4
            row = (warp // 4) * 64 + (warp % 4) * 16 + gq + 8 * (c >> 1)
            tok = 8 * n + 2 * t + (c & 1)
            v = float(d[th, reg])
            if abs(v - float(r[tok, row])) <= 2e-2 * (1 + abs(v)):
                hits += 1
            elif shown < 12:
                idx = int((r - v).abs().argmin())
                print(f"  thread {th} reg {reg}: {v:.4f}, expected (tok {tok}, row {row}) {float(r[tok, row]):.4f}; "
                      f"closest (tok {idx // N}, row {idx % N}) {float(r.view(-1)[idx]):.4f}", flush=True)
                shown += 1
    print(f"diagnose: {hits} of {256 * 32} registers where expected; |acc| mean {float(d.abs().mean()):.3f}, "
          f"|ref| mean {float(r.abs().mean()):.3f}", flush=True)


@torch.inference_mode()
def main():
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    t0 = time.time()
    for model in sys.argv[1:] or ["llama3-8b"]:
        g = torch.Generator().manual_seed(1)
        ws = []
        for name, K, N in MODELS[model]:
            q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
            ws.append({"name": name, "K": K, "N": N, "raw": (q, s, z), "w": W.prepare_w4a16(q, s, z, 128),
                       "wg": V.prepare_wg(q, s, z, 128)})
        failed = False
        for m in [int(v) for v in os.environ.get("MS", "64,32").split(",")]:
            xs = {d["K"]: torch.randn(m, d["K"], device="cuda", dtype=torch.bfloat16) for d in ws}
            ok = {}
            for d in ws:
                q, s, z = d["raw"]
                r = xs[d["K"]].float() @ ref.dequant_w4(q, s, z).float().T
                for v, c in VARIANTS.items():
                    try:
                        y = V.w4wg_linear(xs[d["K"]], d["wg"], c)
                        y2 = V.w4wg_linear(xs[d["K"]], d["wg"], c)
                    except SpecqError as e:
                        print("skip", d["name"], v, e, flush=True)
                        continue
                    e = ((y.float() - r).norm() / r.norm()).item()
                    same = bool(torch.equal(y, y2))
                    if e < 1e-2 and same:
                        ok.setdefault(d["name"], []).append(v)
                    else:
                        failed = True
                        print("CHECK FAILED", model, m, d["name"], v, f"rel {e:.3g}",
                              "deterministic" if same else "NOT deterministic", flush=True)
            if failed:
                diagnose()
                return
            tri = {d["name"]: graph_time([lambda d=d: W.w4a16_linear(xs[d["K"]], d["w"], cfg=W.default_config(m, d["N"], d["K"]))])
                   for d in ws}
            best = {}
            for d in ws:
                t = {v: graph_time([lambda d=d, v=v: V.w4wg_linear(xs[d["K"]], d["wg"], VARIANTS[v])])
                     for v in ok.get(d["name"], [])}
                by = d["N"] * d["K"] / 2
                if t:
                    best[d["name"]] = min(t, key=t.get)
                print(f"{model} M={m} {d['name']:8s} triton {tri[d['name']]:6.1f} | " +
                      " ".join(f"{k} {v:6.1f}" for k, v in sorted(t.items(), key=lambda kv: kv[1])) +
                      (f" | best {t[best[d['name']]]:.1f} us = {by / t[best[d['name']]] / 1e3:.0f} GB/s" if t else ""),
                      flush=True)
            tt = graph_time([lambda d=d: W.w4a16_linear(xs[d["K"]], d["w"], cfg=W.default_config(m, d["N"], d["K"]))
                             for d in ws])
            layer = {}
            for v in VARIANTS:
                if all(v in ok.get(d["name"], []) for d in ws):
                    layer[v] = graph_time([lambda d=d, v=v: V.w4wg_linear(xs[d["K"]], d["wg"], VARIANTS[v]) for d in ws])
            layer["default"] = graph_time([lambda d=d: V.w4wg_linear(xs[d["K"]], d["wg"]) for d in ws])
            if len(best) == len(ws):
                layer["per-matmul-best"] = graph_time([lambda d=d: V.w4wg_linear(xs[d["K"]], d["wg"],
                                                                                 VARIANTS[best[d["name"]]]) for d in ws])
                layer["per-matmul-best-nopdl"] = graph_time([lambda d=d: V.w4wg_linear(
                    xs[d["K"]], d["wg"], VARIANTS[best[d["name"]]], pdl=False) for d in ws])
            print(f"{model} M={m} LAYER triton {tt:6.1f} | " +
                  " ".join(f"{k} {v:6.1f}" for k, v in sorted(layer.items(), key=lambda kv: kv[1])) +
                  f"  best per matmul: {best}", flush=True)
        print(f"[{time.time() - t0:.0f} s]", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if os.environ.get("DIAG"):
        diagnose()
    else:
        main()
