"""Per-CTA timeline of a chain of Llama-3-8B layers (4 Linears each on w4mma, distinct weights, as bench/qdec_overhead.py
times them; one norm-like kernel first), without compensation, with the in-grid path at k, and with the diagnostics
QDIAG 4 (compensation CTAs wait and store zeros, the epilogue adds nothing) and 3 (they exit at once):
where does the chain lose what the one-layer timeline (qdec_cta_timeline.py) does not show?

    PYTHONPATH=$PWD LAYERS=3 python bench/dev/qdec_chain_timeline.py [k=0.005]

Stamps as in qdec_cta_timeline.py, but each launch finds its slot (layer * 4 + projection) by its weight pointer in a
__device__ table QW written before the replays, so every launch of the chain keeps its own stamps.
Per Linear: x ready (first GEMV CTA past its wait) and the last GEMV CTA's end, us from the chain's first CTA, medians
over 8 replays; and per variant the chain's end.
"""
import ctypes
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import qdec_cta_timeline as T  # noqa: E402
from bench.qdec_overhead import SHAPES, SpecqW4, acts, rand_residual  # noqa: E402
from specq.compensate import CompensatedLinear, mma  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402
from specq.compensate.tune import graph_of  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear, w4mma  # noqa: E402

SLOTS = 16
T.HEAD = r"""
__device__ long long STAMP[16 * 4096 * 6];
__device__ unsigned long long QW[16];
__device__ __forceinline__ long long gtm() { long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ int qslot(const void* p) {
    int s = 0;
    for (int i = 0; i < 16; i++) if (QW[i] == (unsigned long long)p) s = i;
    return s;
}
#define SOFF ((qslot(qw) * 4096 + (int)blockIdx.x) * 6)
"""


def set_table(kern, ptrs):
    cuda = ctypes.CDLL("libcuda.so.1")
    ptr, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    assert cuda.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), kern.module, b"QW") == 0
    arr = (ctypes.c_uint64 * SLOTS)(*(ptrs + [0] * (SLOTS - len(ptrs))))
    assert cuda.cuMemcpyHtoD_v2(ptr, ctypes.cast(arr, ctypes.c_void_p), size) == 0


@torch.inference_mode()
def main():
    kf = float(sys.argv[1]) if len(sys.argv) > 1 else 0.005
    L = int(os.environ.get("LAYERS", "3"))
    orig = w4mma.source
    w4mma.source = lambda *a, **k: T.stamped(orig(*a, **k))
    w4mma._KERNELS.clear()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, f"{L} layers")
    xs, stats = {}, {}
    for p, (K, N) in SHAPES.items():
        ch = torch.exp(torch.randn(K, device=dev))
        stats[p] = SEL.calib_stats(acts(256, K, ch, dev).float().cpu())
        xs[p] = acts(1, K, ch, dev)
    layers = [{p: CompensatedLinear(SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear), rand_residual(K, N), k_chunk=0,
                                    selector="approx", stats=stats[p]) for p, (K, N) in SHAPES.items()}
              for _ in range(L)]
    ptrs = [cl.base.w.mma.words.data_ptr() for mods in layers for cl in mods.values()]
    names = [f"L{i} {p.split('_')[0]}" for i in range(L) for p in SHAPES]
    res = {}
    for var, k, diag in (("k=0", 0.0, ""), (f"k={kf}", kf, ""), ("QDIAG 4", kf, "#define QDIAG 4\n"),
                         ("QDIAG 3", kf, "#define QDIAG 3\n"), ("k=0 again", 0.0, "")):
        mma.DIAG = diag
        for mods in layers:
            for cl in mods.values():
                cl.set_k(SEL.k_chunk_for(cl.in_features, k))

        def step():
            xs["qkv_proj"].mul_(1.0)
            for mods in layers:
                for p, cl in mods.items():
                    cl(xs[p])
        step()
        torch.cuda.synchronize()
        g = graph_of(step, warm=3)
        kerns = [kv for key, kv in w4mma._KERNELS.items() if key[0] == "w4mma"]
        for kv in kerns:
            set_table(kv, ptrs)
        agg = {}
        for rep in range(8):
            for kv in kerns:
                T.clear_stamps(kv)
            g.replay()
            torch.cuda.synchronize()
            runs = {}
            for kv in kerns:
                st = T.read_stamps(kv).view(SLOTS, 4096, T.NS)
                for s in range(len(ptrs)):
                    r = st[s][st[s][:, 1] != 0]
                    if len(r):
                        assert s not in runs, "two kernels wrote one slot"
                        runs[s] = r.double()
            assert len(runs) == len(ptrs), (len(runs), len(ptrs))
            t0 = min(r[:, 1].min().item() for r in runs.values())
            for s in range(len(ptrs)):
                r = runs[s]
                gv, comp = r[r[:, 5] == 0], r[r[:, 5] == 1]
                vals = {"x ready": (gv[:, 2] - t0).min().item() / 1e3,
                        "entry p50": T.pct(((gv[:, 1] - t0) / 1e3).tolist(), 0.5),
                        "loop p50": T.pct(((gv[:, 3] - gv[:, 2]) / 1e3).tolist(), 0.5),
                        "epi max": ((gv[:, 4] - gv[:, 3]) / 1e3).max().item(),
                        "end max": (gv[:, 4] - t0).max().item() / 1e3,
                        "comp entry": (comp[:, 1] - t0).min().item() / 1e3 if len(comp) else float("nan"),
                        "comp end": (comp[:, 4] - t0).max().item() / 1e3 if len(comp) else float("nan")}
                for a, b in vals.items():
                    agg.setdefault(s, {}).setdefault(a, []).append(b)
        res[var] = {s: {a: statistics.median(v) for a, v in d.items()} for s, d in agg.items()}
        del g
    cols = list(res["k=0"][0])
    for var, d in res.items():
        print(f"== {var}: medians over 8 replays, us from the chain's first CTA entry")
        print(f"{'':10s}" + "".join(f"{c:>11s}" for c in cols) + f"{'+end vs k=0':>13s}")
        for s, v in d.items():
            print(f"{names[s]:10s}" + "".join(f"{v[c]:11.2f}" for c in cols) +
                  f"{v['end max'] - res['k=0'][s]['end max']:13.2f}")


if __name__ == "__main__":
    main()
