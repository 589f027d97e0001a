"""Per-CTA timeline of one Llama-3-8B layer (4 Linears on w4mma, a norm-like kernel first, CUDA graph), without
compensation and with the in-grid path at k: which CTAs start late, which run long, where the epilogue waits.

    PYTHONPATH=$PWD python bench/dev/qdec_cta_timeline.py [k=0.005]      (QDIAG=n as qdec_profile.py)

w4mma's source is stamped (string edits, this script only): thread 0 of every CTA records %smid and %globaltimer at
entry, after griddepcontrol.wait, after the main loop and at the end (after a barrier), into a __device__ array read
back through cuModuleGetGlobal. qkv's and gate_up's uncompensated GEMVs share one kernel: their grids (384 / 1792
CTAs) write separate halves.
Per projection and run: the span from the layer's first stamp; GEMV CTAs: entry (dispatch) p50 / max, wait release
(x ready) min, main loop p50 / p90 / max (on SMs with a compensation CTA and without), epilogue p50 / max, last end;
compensation CTAs: entry, end max.
"""
import ctypes
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import SHAPES, SpecqW4, acts, rand_residual  # noqa: E402
from specq.compensate import CompensatedLinear, mma  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402
from specq.compensate.tune import graph_of  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear, w4mma  # noqa: E402

NS, HALF = 6, 4096
HEAD = r"""
__device__ long long STAMP[2 * 4096 * 6];
__device__ __forceinline__ long long gtm() { long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
#define SOFF (((int)gridDim.x > 1000 ? 4096 : 0) + (int)blockIdx.x) * 6
"""


def stamped(src: str) -> str:
    edits = [
        ("    __shared__ float4 red[WARPS][NT][32];\n",
         "    __shared__ float4 red[WARPS][NT][32];\n    const long long S0 = gtm();\n    long long S2 = 0, S3 = 0;\n"),
        ("        return;\n    }\n#endif\n",
         "        __syncthreads();\n        if (threadIdx.x == 0) { unsigned sm; asm(\"mov.u32 %0, %%smid;\" : \"=r\"(sm));\n"
         "            STAMP[SOFF] = sm; STAMP[SOFF + 1] = S0; STAMP[SOFF + 4] = gtm(); STAMP[SOFF + 5] = 1; }\n"
         "        return;\n    }\n#endif\n"),
        ("    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n",
         "    S2 = gtm();\n    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n"),
        ("#pragma unroll\n    for (int n = 0; n < NT; n++) red[warp][n][lane] = make_float4",
         "    S3 = gtm();\n#pragma unroll\n    for (int n = 0; n < NT; n++) red[warp][n][lane] = make_float4"),
    ]
    for a, b in edits:
        assert src.count(a) == (1 if "return" not in a else src.count(a)) and (src.count(a) <= 1), a
        src = src.replace(a, b)
    i = src.rstrip().rfind("}")
    tail = ("    __syncthreads();\n    if (threadIdx.x == 0) { unsigned sm; asm(\"mov.u32 %0, %%smid;\" : \"=r\"(sm));\n"
            "        STAMP[SOFF] = sm; STAMP[SOFF + 1] = S0; STAMP[SOFF + 2] = S2; STAMP[SOFF + 3] = S3;\n"
            "        STAMP[SOFF + 4] = gtm(); STAMP[SOFF + 5] = 0; }\n}\n")
    return HEAD + src[:i] + tail


def read_stamps(kern) -> torch.Tensor:
    cuda = ctypes.CDLL("libcuda.so.1")
    ptr, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    assert cuda.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), kern.module, b"STAMP") == 0
    out = torch.empty(size.value // 8, dtype=torch.int64)
    assert cuda.cuMemcpyDtoH_v2(ctypes.c_void_p(out.data_ptr()), ptr, size) == 0
    return out.view(-1, NS)


def clear_stamps(kern):
    cuda = ctypes.CDLL("libcuda.so.1")
    ptr, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    assert cuda.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), kern.module, b"STAMP") == 0
    assert cuda.cuMemsetD8_v2(ptr, 0, size) == 0


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


@torch.inference_mode()
def main():
    kf = float(sys.argv[1]) if len(sys.argv) > 1 else 0.005
    if os.environ.get("QDIAG"):
        mma.DIAG = f"#define QDIAG {int(os.environ['QDIAG'])}\n"
    orig = w4mma.source
    w4mma.source = lambda *a, **k: stamped(orig(*a, **k))
    w4mma._KERNELS.clear()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    mods, xs = {}, {}
    for p, (K, N) in SHAPES.items():
        ch = torch.exp(torch.randn(K, device=dev))
        stats = SEL.calib_stats(acts(256, K, ch, dev).float().cpu())
        mods[p] = CompensatedLinear(SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear), rand_residual(K, N), k_chunk=0,
                                    selector="approx", stats=stats)
        xs[p] = acts(1, K, ch, dev)
    for k in (0.0, kf):
        for cl in mods.values():
            cl.set_k(SEL.k_chunk_for(cl.in_features, k))

        def step():
            xs["qkv_proj"].mul_(1.0)
            for p, cl in mods.items():
                cl(xs[p])
        g = graph_of(step, warm=3)
        kerns = {key: kv for key, kv in w4mma._KERNELS.items() if key[0] == "w4mma"}
        agg = {}
        for rep in range(8):
            for kv in kerns.values():
                clear_stamps(kv)
            g.replay()
            torch.cuda.synchronize()
            runs = []                               # the stamps of each launch of this replay
            for kv in kerns.values():
                st = read_stamps(kv)
                for half in (0, 1):
                    r = st[half * HALF:(half + 1) * HALF]
                    r = r[r[:, 1] != 0]
                    if len(r):
                        runs.append(r.double())
            assert len(runs) == 4, len(runs)
            runs.sort(key=lambda r: r[:, 1].min().item())
            t0 = runs[0][:, 1].min().item()
            for p, r in zip(SHAPES, runs):
                gv, comp = r[r[:, 5] == 0], r[r[:, 5] == 1]
                csm = set(comp[:, 0].long().tolist())
                on = torch.tensor([int(x) in csm for x in gv[:, 0].long().tolist()], dtype=torch.bool)
                ml = ((gv[:, 3] - gv[:, 2]) / 1e3).tolist()
                ep = ((gv[:, 4] - gv[:, 3]) / 1e3).tolist()
                vals = {"CTAs": len(gv), "comp": len(comp),
                        "entry p50": pct(((gv[:, 1] - t0) / 1e3).tolist(), 0.5),
                        "entry max": (gv[:, 1] - t0).max().item() / 1e3,
                        "x ready": (gv[:, 2] - t0).min().item() / 1e3,
                        "loop p50": pct(ml, 0.5), "loop p90": pct(ml, 0.9), "loop max": max(ml),
                        "loop p50 comp-SM": pct([m for m, o in zip(ml, on.tolist()) if o], 0.5),
                        "epi p50": pct(ep, 0.5), "epi max": max(ep),
                        "end p50": pct(((gv[:, 4] - t0) / 1e3).tolist(), 0.5),
                        "end max": (gv[:, 4] - t0).max().item() / 1e3,
                        "comp entry": (comp[:, 1] - t0).min().item() / 1e3 if len(comp) else float("nan"),
                        "comp end": (comp[:, 4] - t0).max().item() / 1e3 if len(comp) else float("nan")}
                for a, b in vals.items():
                    agg.setdefault(p, {}).setdefault(a, []).append(b)
        print(f"== k_fraction {k}: medians over 8 replays, us from the layer's first CTA entry")
        cols = list(next(iter(agg.values())))
        print(f"{'':14s}" + "".join(f"{c:>10s}" for c in [c.replace('loop p50 comp-SM', 'loop@comp') for c in cols]))
        for p, d in agg.items():
            print(f"{p:14s}" + "".join(f"{statistics.median(v):10.2f}" for v in d.values()))


if __name__ == "__main__":
    main()
