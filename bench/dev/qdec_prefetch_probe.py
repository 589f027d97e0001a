"""Does an L2 prefetch of pinned host memory (zero-copy, the mapped pointer) help a later load? One thread, one fresh
128-byte line per measurement (4 KB apart, never touched before), median over 64 lines per mode:

    cold     one load, nothing before it (the PCIe round trip)
    again    the same line loaded twice, the second timed (.cg: does L2 keep a host line?)
    nc2      the same with ld.global.nc (the texture path qdec1 uses)
    pf       prefetch.global.L2 of the line, 5 us of spinning, then the timed load
    bulk     cp.async.bulk.prefetch.L2 of the line (128 bytes), 5 us, then the timed load
    spin     5 us of spinning, then the timed load (control for pf / bulk)
    pfnow    prefetch.global.L2, then the timed load at once (does the load merge with the fill in flight?)
    pfl1     prefetch.global.L1, 5 us, then the timed load (ld.global.nc, the path qdec1 uses)
    pfl1now  prefetch.global.L1, then the timed ld.global.nc at once
    ca2      the same line loaded twice with ld.global.ca, the second timed
    cpa      cp.async.ca of 4 bytes of the line into shared memory (no register), 5 us, then the timed ld.global.nc
    cpanow   the same without the 5 us
    cpaN     the same with N ns between (does the load wait for the fill in flight, or ask again?); cpa600w: the
             timed load of the next word (same sector), cpa600s of the next sector of the line

    PYTHONPATH=$PWD python bench/dev/qdec_prefetch_probe.py
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.compensate.kernel import mapped  # noqa: E402
from specq.kernels import pdl as PDL  # noqa: E402
from specq.kernels import w4mma  # noqa: E402

MODES = ["cold", "again", "nc2", "pf", "bulk", "spin", "pfnow", "pfl1", "pfl1now", "ca2", "cpa", "cpanow", "cpa300", "cpa600", "cpa900", "cpa600w", "cpa600s"]
SRC = r"""
typedef unsigned int u32;
__device__ __forceinline__ long long gt() { long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ u32 ldcg(const u32* p) { u32 v; asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ u32 ldnc(const u32* p) { u32 v; asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ u32 ldca(const u32* p) { u32 v; asm volatile("ld.global.ca.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ u32 use(u32 v) { u32 w; asm volatile("add.u32 %0, %1, 1;" : "=r"(w) : "r"(v) : "memory"); return w; }
__device__ __forceinline__ void spin(long long ns) { const long long t = gt(); while (gt() - t < ns) {} }
// h: host words (mapped), line i at word i * 1024; out[i] = ns of the timed load of line i
extern "C" __global__ void probe(const u32* h, int mode, int lines, long long* out) {
    u32 sink = 0;
    __shared__ u32 scr[4];
    for (int i = 0; i < lines; i++) {
        const u32* p = h + (size_t)i * 1024;
        if (mode == 1) sink += use(ldcg(p));
        if (mode == 2) sink += use(ldnc(p));
        if (mode == 3) asm volatile("prefetch.global.L2 [%0];" :: "l"(p) : "memory");
        if (mode == 4) asm volatile("cp.async.bulk.prefetch.L2.global [%0], 128;" :: "l"(p) : "memory");
        if (mode == 6) asm volatile("prefetch.global.L2 [%0];" :: "l"(p) : "memory");
        if (mode == 7 || mode == 8) asm volatile("prefetch.global.L1 [%0];" :: "l"(p) : "memory");
        if (mode == 9) sink += use(ldca(p));
        if (mode >= 10) {
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"((u32)__cvta_generic_to_shared(scr)), "l"(p) : "memory");
            asm volatile("cp.async.commit_group;" ::: "memory");
        }
        if (mode == 10) spin(5000);
        if (mode == 12) spin(300);
        if (mode == 13 || mode == 15 || mode == 16) spin(600);
        if (mode == 14) spin(900);
        if ((mode >= 3 && mode <= 5) || mode == 7) spin(5000);
        const long long t0 = gt();
        const u32* q = mode == 15 ? p + 1 : mode == 16 ? p + 8 : p;
        const u32 v = mode >= 10 ? ldnc(q) : mode == 2 || mode == 7 || mode == 8 ? ldnc(p) : mode == 9 ? ldca(p) : ldcg(p);
        sink += use(v);
        out[i] = gt() - t0;
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    out[lines] = sink + scr[0];
}
"""


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    k = w4mma.compiled(("probe_prefetch",), lambda: SRC, "probe")
    lines = 64
    out = torch.zeros(lines + 1, dtype=torch.int64, device=dev)
    for mode, name in enumerate(MODES):
        vals = []
        for rep in range(3):
            h = torch.randint(0, 1 << 30, (lines * 1024,), dtype=torch.int32).pin_memory()   # fresh lines
            PDL.launch(k, (1, 1, 1), (1, 1, 1), [mapped(h), mode, lines, out], pdl=False)
            torch.cuda.synchronize()
            vals += out[:lines].tolist()
        print(f"{name:6s} median {statistics.median(vals):7.0f} ns   min {min(vals):6.0f}   max {max(vals):7.0f}")


if __name__ == "__main__":
    main()
