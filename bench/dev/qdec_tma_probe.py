"""Residual rows from pinned host memory (zero-copy, the mapped pointer): SM loads (what qdec1 does: every thread one
4-byte word of each row, all in flight) against the SM's bulk-copy engine (TMA: cp.async.bulk global -> shared with an
mbarrier, a few instructions from one warp). Two questions:

  A. latency: F CTAs each fetch NR rows of RB bytes (fresh lines every rep), ns from issue to the data used
  B. interference: the same fetches (repeated) in the first F CTAs of a one-wave grid whose other CTAs stream HBM
     with plain loads as w4mma does; the streaming CTAs' time with no fetch / SM loads / bulk copies

    PYTHONPATH=$PWD python bench/dev/qdec_tma_probe.py
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.compensate.kernel import mapped  # noqa: E402
from specq.kernels import pdl as PDL  # noqa: E402
from specq.kernels import w4mma  # noqa: E402

THREADS = 512
STRIDE = 8192          # bytes between host rows
SRC = r"""
typedef unsigned int u32;
#define THREADS 512
__device__ __forceinline__ long long gt() { long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ u32 ldh(const u32* p) { u32 v; asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p)); return v; }
// h: host rows (STRIDE bytes apart): CTA b, rep r, row j at row index (b * reps + r) * NR + j.
// mode 0 none, 1 SM loads, 2 bulk copies. CTAs >= F stream sw uint4 each from hbm.
extern "C" __global__ void __launch_bounds__(THREADS, 2)
probe(const u32* h, const uint4* hbm, int mode, int F, int NR, int RB, int reps, int sw, long long* out, u32* sink)
{
    extern __shared__ uint4 buf[];
    __shared__ __align__(8) unsigned long long mbar;
    const int t = threadIdx.x, b = blockIdx.x;
    u32 acc = 0;
    if (b >= F) {                                        // HBM stream, 8 uint4 in flight per thread
        const long long t0 = gt();
        const uint4* p = hbm + (size_t)(b - F) * sw;
        for (int i = t; i < sw; i += THREADS * 8) {
            uint4 v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) v[u] = i + u * THREADS < sw ? __ldg(p + i + u * THREADS) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int u = 0; u < 8; u++) acc ^= v[u].x + v[u].y + v[u].z + v[u].w;
        }
        __syncthreads();
        if (t == 0) out[F * reps + (b - F)] = gt() - t0;
        if (acc == 0x12345678u) sink[0] = acc;
        return;
    }
    if (mode == 0) return;
    const u32 mb = (u32)__cvta_generic_to_shared(&mbar);
    if (t == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(mb), "r"(1) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int words = RB / 4, nw = NR * words;           // words per rep
    for (int r = 0; r < reps; r++) {
        const u32* base = h + (size_t)(b * reps + r) * NR * (STRIDE / 4);
        __syncthreads();
        const long long t0 = gt();
        if (mode == 1) {
            u32 q[32];
#pragma unroll
            for (int i = 0; i < 32; i++) {
                const int k = i * THREADS + t;
                q[i] = k < nw ? ldh(base + (size_t)(k / words) * (STRIDE / 4) + k % words) : 0u;
            }
#pragma unroll
            for (int i = 0; i < 32; i++) acc += q[i];
        } else {
            if (t < 32) {
                if (t == 0) asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(mb), "r"(NR * RB) : "memory");
                __syncwarp();
                for (int j = t; j < NR; j += 32) {
                    const u32 dst = (u32)__cvta_generic_to_shared(buf) + j * RB;
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                                 :: "r"(dst), "l"(base + (size_t)j * (STRIDE / 4)), "r"(RB), "r"(mb) : "memory");
                }
            }
            u32 done = 0;
            while (!done)
                asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                             : "=r"(done) : "r"(mb), "r"(r & 1) : "memory");
            const u32* s = (const u32*)buf;
            for (int k = t; k < nw; k += THREADS) acc += s[k];
        }
        __syncthreads();
        if (t == 0) out[b * reps + r] = gt() - t0;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}
""".replace("STRIDE", str(STRIDE))


def run(k, mode, F, NR, RB, reps, S=0, sw=0):
    dev = torch.device("cuda")
    h = torch.randint(0, 1 << 30, (max(F, 1) * reps * NR * STRIDE // 4,), dtype=torch.int32).pin_memory()
    hbm = torch.randint(0, 1 << 30, (max(S, 1) * max(sw, 1) * 4,), dtype=torch.int32, device=dev)
    out = torch.zeros(F * reps + S, dtype=torch.int64, device=dev)
    sink = torch.zeros(1, dtype=torch.int32, device=dev)
    PDL.launch(k, (F + S, 1, 1), (THREADS, 1, 1), [mapped(h), hbm, mode, F, NR, RB, reps, sw, out, sink],
               shared_mem=NR * RB if mode == 2 else 0, pdl=False)
    torch.cuda.synchronize()
    o = out.tolist()
    return o[:F * reps], o[F * reps:]


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    k = w4mma.compiled(("probe_tma",), lambda: SRC, "probe")
    names = {1: "SM loads", 2: "bulk copy"}
    print("A. fetch latency, ns from issue to data used (median / max over CTAs x 4 reps, 3 launches)")
    for F, NR, RB in [(1, 1, 128), (1, 1, 2048), (1, 5, 2048), (4, 5, 2048), (8, 5, 1024), (1, 10, 2048),
                      (7, 10, 2048), (1, 20, 2048), (16, 5, 2048), (64, 5, 2048)]:
        for mode in (1, 2):
            if mode == 1 and NR * RB // 4 > 32 * THREADS:
                continue
            v = []
            for _ in range(3):
                v += run(k, mode, F, NR, RB, 4)[0]
            print(f"  F={F:3d} rows={NR:3d} x {RB:5d} B ({F * NR * RB / 1024:6.1f} KB)  {names[mode]:9s} "
                  f"median {statistics.median(v):6.0f}  max {max(v):6.0f}")
    print("B. HBM streaming CTAs beside fetching CTAs (one wave: F + S CTAs of 512 threads, 1 per SM slot)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for F, NR, RB in [(4, 5, 2048), (8, 10, 2048), (8, 5, 2048)]:
        S = 2 * sms - F
        for mode in (0, 1, 2):
            st, fe = [], []
            for _ in range(3):
                f, s = run(k, mode, F, NR, RB, 24, S, 256 * 1024 // 16)
                st += s
                fe += f
            print(f"  F={F} {NR} x {RB} B, S={S}: {['none', *names.values()][mode]:9s} stream median "
                  f"{statistics.median(st) / 1e3:6.2f} us  max {max(st) / 1e3:6.2f}" +
                  (f"  | fetch median {statistics.median(fe):6.0f} ns" if fe and mode else ""))


if __name__ == "__main__":
    main()
