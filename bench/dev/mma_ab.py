"""A/B of the NVRTC CUDA W4A16 kernel (specq/kernels/w4mma.py) against the Triton kernel and torch int4, M <= 16:
every variant checked against the reference first (rel err <= 1e-2, bf16, and fp16 on one shape), then the
whole layer timed in one CUDA graph (10 layers per replay, bench/kernels.graph_time), all in one run.
PYTHONPATH=$PWD python bench/dev/mma_ab.py [llama3-8b] [llama3-70b]"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time, layer_fns, make_weights  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4a16 as W  # noqa: E402
from specq.kernels import w4mma as C  # noqa: E402

SMALL = {"def": {}, "m2": {"MINB": 2}, "w16": {"WARPS": 16, "MINB": 1}, "w16m2": {"WARPS": 16, "MINB": 2},
         "l2": {"L2HINT": True}, "p6": {"P": 6}, "p4": {"P": 4}, "roll": {"ROLL": True}}
LARGE = {"def": {}, "p4": {"P": 4}, "m2": {"MINB": 2}, "tmpm2": {"PRE": False, "MINB": 2},
         "w4": {"WARPS": 4}, "tmp": {"PRE": False}}


def variants(m):
    return SMALL if m <= 16 else LARGE


def run(x, w, v):
    c = C.default_config(x.shape[0], w.N, w.K)
    c = c._replace(**variants(x.shape[0])[v])
    if w.K % (128 * c.WARPS):
        c = c._replace(WARPS=C.default_config(x.shape[0], w.N, w.K).WARPS)
    return C.w4mma_linear(x, w, cfg=c)


@torch.inference_mode()
def main():
    print("torch", torch.__version__, "compile_kernel:", hasattr(torch.cuda, "_compile_kernel"), flush=True)
    t0 = time.time()
    for model in sys.argv[1:] or ["llama3-8b", "llama3-70b"]:
        ws = make_weights(MODELS[model], "cuda")
        for d in ws:
            d["mma"] = C.prepare_mma(*d["w4a16_raw"], 128, torch.bfloat16)
        # fp16 check on the first shape
        q, s, z = ws[0]["w4a16_raw"]
        w16 = C.prepare_mma(q, s.half(), z, 128, torch.float16)
        x16 = torch.randn(3, ws[0]["K"], device="cuda", dtype=torch.float16)
        r16 = x16.float() @ ref.dequant_w4(q, s.half(), z).float().T
        print("fp16 check", ((C.w4mma_linear(x16, w16).float() - r16).norm() / r16.norm()).item(), flush=True)
        bad = set()
        for m in [int(v) for v in os.environ.get("MS", "1,2,4,8,16,32,64").split(",")]:
            xs = {d["K"]: torch.randn(m, d["K"], device="cuda", dtype=torch.bfloat16) for d in ws}
            for d in ws:
                q, s, z = d["raw"] = d["w4a16_raw"]
                r = xs[d["K"]].float() @ ref.dequant_w4(q, s, z).T
                for v in variants(m):
                    e = ((run(xs[d["K"]], d["mma"], v).float() - r).norm() / r.norm()).item()
                    if not e < 1e-2:
                        print("CHECK FAILED", model, m, d["name"], v, e, flush=True)
                        bad.add(v)
            ok = [v for v in variants(m) if v not in bad]
            if not ok:
                continue
            t = {v: graph_time([lambda d=d, v=v: run(xs[d["K"]], d["mma"], v) for d in ws]) for v in ok}
            tt = graph_time([lambda d=d: W.w4a16_linear(xs[d["K"]], d["w4a16"], cfg=W.default_config(m, d["N"], d["K"]))
                             for d in ws])           # an explicit cfg: the Triton kernel, whatever M
            ti = graph_time(layer_fns(ws, "torch_int4", xs))
            best = min(t, key=t.get)
            print(f"{model:10s} M={m:<3d} triton {tt:6.1f}  torch_int4 {ti:6.1f}  | " +
                  " ".join(f"{k} {v:6.1f}" for k, v in t.items()) + f"  | best {best} {t[best] / tt:.3f}x triton",
                  flush=True)
            if m in (1, 16, 64):   # per matmul, best variant vs triton
                for d in ws:
                    a = graph_time([lambda d=d: run(xs[d["K"]], d["mma"], best)])
                    b = graph_time([lambda d=d: W.w4a16_linear(xs[d["K"]], d["w4a16"],
                                                               cfg=W.default_config(m, d["N"], d["K"]))])
                    by = d["N"] * d["K"] / 2
                    print(f"   {d['name']:8s} cuda {a:6.1f} us ({by / a / 1e3:5.0f} GB/s)  triton {b:6.1f} us "
                          f"({by / b / 1e3:5.0f} GB/s)", flush=True)
        print(f"[{time.time() - t0:.0f} s]", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
