"""What the one-token compensation path cannot go below on this GPU (issue QDEC, goal <= 5% at k = 0.005).

    PYTHONPATH=$PWD python bench/dev/qdec_floor.py

1. PCIe round trip of one zero-copy read from pinned host memory (one thread chasing pointers over 8 MB, every
   hop a new 128-byte line), against the same chase in device memory.
2. qdec1 (specq.compensate.mma) alone, per Llama-3-8B projection at k = 0.005, with %globaltimer / clock64 stamps:
   selection (input to chosen rows), fetch (chosen rows to partials), and the grid's span.
3. Fetch only (rows chosen at random beforehand, no selection): the same bytes with 4- and 16-byte loads per thread.
4. The uncompensated w4mma GEMV of each projection (CUDA-graph replays of 20 launches, PDL as in decoding).
Prints one table; the floor of the compensated path per projection is (selection + one round trip + transfer),
to be hidden inside the GEMV.
"""
import importlib
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import SHAPES, SpecqW4, acts, rand_residual  # noqa: E402
from specq.compensate import CompensatedLinear, mma  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402
from specq.compensate.kernel import mapped  # noqa: E402
from specq.kernels import pdl as PDL  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear, w4mma  # noqa: E402


def go(k, grid, block, args):
    PDL.launch(k, grid, block, args, pdl=False)

GT = r"""
__device__ __forceinline__ long long gt() { long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
"""
CHASE = GT + r"""
extern "C" __global__ void chase(const long long* p, int n, long long* out) {
    long long i = 0, c0 = clock64(), t0 = gt();
    for (int s = 0; s < n; s++) asm volatile("ld.volatile.global.s64 %0, [%1];" : "=l"(i) : "l"(p + i));
    out[0] = gt() - t0; out[1] = clock64() - c0; out[2] = i;
}
"""
FETCH = GT + r"""
typedef unsigned int u32;
// rows idx [n, KC] (device), codes [K, W] words (host, mapped); VEC words per load; one CTA per (chunk, column block)
extern "C" __global__ void fetch(const int* idx, const u32* codes, float* ws, int W, long long* st) {
    const int t = threadIdx.x, c = blockIdx.x;
    const long long T0 = gt();
    __shared__ int sidx[KC];
    if (t < KC) sidx[t] = idx[c * KC + t];
    __syncthreads();
    const int w = (blockIdx.y * 256 + t) * VEC;
    float acc = 0.f;
    if (w < W) {
#if VEC == 4
        uint4 q[KC];
#pragma unroll
        for (int s = 0; s < KC; s++) asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(q[s].x), "=r"(q[s].y), "=r"(q[s].z), "=r"(q[s].w) : "l"(codes + (size_t)sidx[s] * W + w));
#pragma unroll
        for (int s = 0; s < KC; s++) acc += (float)(q[s].x & 15u) + (float)(q[s].y & 15u) + (float)(q[s].z & 15u) + (float)(q[s].w & 15u);
#else
        u32 q[KC];
#pragma unroll
        for (int s = 0; s < KC; s++) asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(q[s]) : "l"(codes + (size_t)sidx[s] * W + w));
#pragma unroll
        for (int s = 0; s < KC; s++) acc += (float)(q[s] & 15u);
#endif
        ws[(size_t)c * W + w] = acc;
    }
    __syncthreads();
    if (t == 0) { const int b = blockIdx.y * gridDim.x + c; st[2 * b] = T0; st[2 * b + 1] = gt(); }
}
"""


def stamped_qdec1(C, KC, NB, wpt):
    """qdec1's source (one chunk per CTA) with stamps: st[cta] = (start, rows chosen, partial written) in globaltimer
    ns, their clock64, and clock64 after x is loaded, after the buckets, after the boundary bucket (select_chunk)."""
    src = mma.source(C, KC, NB, False, False, wpt)
    src = src.replace("#define FULL", GT + "__shared__ long long STM[3], STT[4];\n#define FULL", 1)
    src = src.replace("      int nch)", "      int nch, long long* st)")
    src = src.replace("    __shared__ float th[CH][NB];", "    if (threadIdx.x == 0) { STT[0] = gt(); STT[2] = clock64(); }\n    __shared__ float th[CH][NB];", 1)
    src = src.replace("    u32 q[WPT][CH][KC];", "    if (threadIdx.x == 0) { STT[1] = gt(); STT[3] = clock64(); }\n    u32 q[WPT][CH][KC];", 1)
    tail = ("    __syncthreads();\n    if (threadIdx.x == 0) { const int b = blockIdx.y * gridDim.x + blockIdx.x;\n"
            "        st[9*b] = STT[0]; st[9*b+1] = STT[1]; st[9*b+2] = gt(); st[9*b+3] = STT[2]; st[9*b+4] = STT[3]; st[9*b+5] = clock64();\n"
            "        st[9*b+6] = STM[0]; st[9*b+7] = STM[1]; st[9*b+8] = STM[2]; }\n}\n")
    i = src.rstrip().rfind("}")
    src = src[:i] + tail
    for a, k in (("f32(ldx(x + c * C + t * CPT + j)) : 0.f;\n    __syncthreads();\n", 0),
                 ("atomicAdd(&hist[bk[j]], 1);\n    __syncthreads();\n", 1),
                 ("    __syncthreads();\n    const int bstar = bs[0], need = bs[1];\n", 2)):
        assert src.count(a) == 1, k
        src = src.replace(a, a + f"    if (t == 0) STM[{k}] = clock64();\n")
    return src


def graph_us(fn, n=20, reps=50):
    """us per call of fn() in a CUDA graph of n calls (specq.compensate.tune's timer, the tuner's own)."""
    from specq.compensate.tune import _time_graph
    return _time_graph(fn, reps, n) * 1e6


@torch.inference_mode()
def main():
    if os.environ.get("SRCMOD"):                    # qdec1 from another module (e.g. an uncommitted copy of mma.py)
        mma._SRC = importlib.import_module(os.environ["SRCMOD"])._SRC
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    # 1. latency
    ch = w4mma.compiled(("probe_chase",), lambda: CHASE, "chase")
    n_el = 1 << 20                                  # 8 MB of int64, hops between 128-byte lines (16 elements)
    lines = torch.randperm(n_el // 16)
    nxt = torch.empty(n_el, dtype=torch.int64)
    nxt[lines * 16] = torch.roll(lines, -1) * 16
    out = torch.zeros(3, dtype=torch.int64, device=dev)
    lat = {}
    for where, buf in (("host (zero-copy, PCIe)", nxt.pin_memory()), ("device (HBM)", nxt.to(dev))):
        ptr = mapped(buf) if buf.device.type == "cpu" else buf
        vals = []
        for _ in range(5):
            go(ch, (1, 1, 1), (1, 1, 1), [ptr, 2000, out])
            torch.cuda.synchronize()
            vals.append((out[0].item() / 2000, out[1].item() / 2000))
        lat[where] = min(vals)
        print(f"one dependent read, {where}: {lat[where][0]:.0f} ns ({lat[where][1]:.0f} SM cycles)")
    # 2.-4. per projection at k = 0.005
    rows = []
    for p, (K, N) in SHAPES.items():
        res = rand_residual(K, N)
        chs = torch.exp(torch.randn(K, device=dev))
        stats = SEL.calib_stats(acts(256, K, chs, dev).float().cpu())
        cl = CompensatedLinear(SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear), res, k_chunk=0, selector="approx",
                               stats=stats)
        cl.set_k(SEL.k_chunk_for(K, 0.005))
        x = acts(1, K, chs, dev)
        mma.partials(cl, x, False)                  # thresholds on the device, float32
        n, C, KC, W = cl.n_chunks, cl.chunk, cl.k_chunk, N // 8
        NB = cl.thr.shape[1]
        wpt = mma.WPT_WIDE if W >= mma.WIDE_W else 1
        k1 = w4mma.compiled(("probe_qdec1", C, KC, NB, wpt), lambda: stamped_qdec1(C, KC, NB, wpt), "qdec1")
        grid = (n, -(-W // (256 * wpt)), 1)
        st = torch.zeros(grid[0] * grid[1], 9, dtype=torch.int64, device=dev)
        ws = torch.empty(n, N, dtype=torch.float32, device=dev)
        sel, fet, span, parts = [], [], [], []
        for r in range(30):
            x = acts(1, K, chs, dev)
            torch.cuda.synchronize()
            go(k1, grid, (256, 1, 1), [x, cl.thr, mapped(res.codes), ws, W, n, st])
            torch.cuda.synchronize()
            if r < 5:
                continue
            s = st.cpu().double()
            sel.append(((s[:, 4] - s[:, 3]).median() / ((s[:, 5] - s[:, 3]) / (s[:, 2] - s[:, 0]).clamp(min=1)).median()).item())
            fet.append((s[:, 2] - s[:, 1]).median().item())
            ns = (s[:, 2] - s[:, 0]) / (s[:, 5] - s[:, 3])       # ns per cycle
            parts.append([((s[:, b] - s[:, a]) * ns).median().item() for a, b in ((3, 6), (6, 7), (7, 8), (8, 4))])
            span.append((s[:, 2].max() - s[:, 0].min()).item())
        # 3. fetch only, random rows
        idx = torch.stack([torch.randperm(C)[:KC] + c * C for c in range(n)]).to(torch.int32).to(dev)
        fo = {}
        for vec in (1, 4):
            kf = w4mma.compiled(("probe_fetch", KC, vec), lambda: f"#define KC {KC}\n#define VEC {vec}\n" + FETCH, "fetch")
            g2 = (n, -(-W // (256 * vec)), 1)
            st2 = torch.zeros(g2[0] * g2[1], 2, dtype=torch.int64, device=dev)
            ws2 = torch.empty(n, W, dtype=torch.float32, device=dev)
            v = []
            for r in range(30):
                idx = torch.stack([torch.randperm(C)[:KC] + c * C for c in range(n)]).to(torch.int32).to(dev)
                torch.cuda.synchronize()
                go(kf, g2, (256, 1, 1), [idx, mapped(res.codes), ws2, W, st2])
                torch.cuda.synchronize()
                if r >= 5:
                    s = st2.cpu()
                    v.append((s[:, 1].max() - s[:, 0].min()).item())
            fo[vec] = (statistics.median(v) / 1e3, g2[0] * g2[1])
        # 4. the GEMV alone
        gemv = graph_us(lambda: cl.base(x))
        kb = n * KC * N // 2 / 1e3
        pm = [statistics.median(v[i] for v in parts) for i in range(4)]
        print(f"  {p} selection ns: x + thresholds loaded {pm[0]:.0f}, buckets + histogram {pm[1]:.0f}, boundary "
              f"{pm[2]:.0f}, scan + slots {pm[3]:.0f}")
        row = dict(proj=p, rows=n * KC, kbytes=kb, qdec1_ctas=grid[0] * grid[1], select_ns=statistics.median(sel),
                   fetch_ns=statistics.median(fet), qdec1_span_us=statistics.median(span) / 1e3,
                   fetch_u32_us=fo[1][0], fetch_u32_ctas=fo[1][1], fetch_v4_us=fo[4][0], fetch_v4_ctas=fo[4][1],
                   gemv_us=gemv)
        rows.append(row)
        print(row, flush=True)
    print(f"\n{'projection':14s} {'rows':>5s} {'KB':>6s} | qdec1: {'select':>7s} {'fetch':>7s} {'span':>6s} | fetch only: "
          f"{'u32':>6s} {'v4':>6s} | {'GEMV':>6s} us")
    for r in rows:
        print(f"{r['proj']:14s} {r['rows']:5d} {r['kbytes']:6.1f} | {r['select_ns'] / 1e3:7.2f} {r['fetch_ns'] / 1e3:7.2f} "
              f"{r['qdec1_span_us']:6.2f} | {r['fetch_u32_us']:6.2f} {r['fetch_v4_us']:6.2f} | {r['gemv_us']:6.2f}")
    print("(select: clock64 of the selection scaled by the CTA's globaltimer/clock ratio; fetch: globaltimer, median "
          "CTA; spans: first start to last end over the grid, globaltimer; GEMV: per launch in a 20-launch graph)")


if __name__ == "__main__":
    main()
