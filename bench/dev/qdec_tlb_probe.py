"""Does the GPU's address translation of pinned host memory cost a zero-copy read? One thread, serial loads
(ld.global.nc, the path qdec1 uses), each region of 2 MB touched for the first time by this kernel:

    cold    the first line of the region
    +512    another line of the same 4 KB page
    +8K     a line of the next 4 KB pages (same 64 KB)
    +256K   same 2 MB, another 64 KB
    +1M     same 2 MB, another 64 KB
    again   the cold line's region once more, a fresh line of its first 4 KB page, after all the others

for host buffers allocated three ways: torch's pin_memory (cudaHostAlloc), an anonymous mmap with
madvise(MADV_HUGEPAGE) then cudaHostRegister (transparent huge pages), the same with MADV_NOHUGEPAGE.
If translation misses cost, the loads in a page already translated are faster than the cold one, and a buffer the
GPU maps with larger pages is faster at the +8K..+1M offsets.

    PYTHONPATH=$PWD python bench/dev/qdec_tlb_probe.py
"""
import ctypes
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.kernels import pdl as PDL  # noqa: E402
from specq.kernels import w4mma  # noqa: E402

REGION = 2 << 20
OFFS = [0, 512, 8192 + 256, (256 << 10) + 384, (1 << 20) + 640, 1024]
NAMES = ["cold", "+512", "+8K", "+256K", "+1M", "again"]
SRC = r"""
typedef unsigned int u32;
__device__ __forceinline__ long long gt() { long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ u32 ldnc(const u32* p) { u32 v; asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ u32 use(u32 v) { u32 w; asm volatile("add.u32 %0, %1, 1;" : "=r"(w) : "r"(v) : "memory"); return w; }
__device__ __forceinline__ void spin(long long ns) { const long long t = gt(); while (gt() - t < ns) {} }
// h: regions of REGION bytes; offs [NO] byte offsets (the last one read after all regions' others); out [n, NO] ns
extern "C" __global__ void probe(const char* h, const int* offs, int NO, int n, long long* out) {
    u32 sink = 0;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < NO - 1; j++) {
            const u32* p = (const u32*)(h + (size_t)i * REGION + offs[j]);
            const long long t0 = gt();
            sink += use(ldnc(p));
            out[i * NO + j] = gt() - t0;
            spin(1000);
        }
    }
    for (int i = 0; i < n; i++) {
        const u32* p = (const u32*)(h + (size_t)i * REGION + offs[NO - 1]);
        const long long t0 = gt();
        sink += use(ldnc(p));
        out[i * NO + NO - 1] = gt() - t0;
        spin(1000);
    }
    if (sink == 0x12345u) out[0] = 0;
}
""".replace("REGION", str(REGION))


class Ptr:
    def __init__(self, p):
        self.p = p

    def data_ptr(self):
        return self.p


def mmap_pinned(nbytes, huge):
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    raw = libc.mmap(None, nbytes + REGION, 3, 0x22, -1, 0)       # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    addr = (raw + REGION - 1) // REGION * REGION
    rc = libc.madvise(addr, nbytes, 14 if huge else 15)           # MADV_HUGEPAGE / MADV_NOHUGEPAGE
    ctypes.memset(addr, 1, nbytes)
    err = torch.cuda.cudart().cudaHostRegister(addr, nbytes, 3)    # portable | mapped
    return addr, rc, err


def thp_of(addr, nbytes):
    """AnonHugePages (kB) of the mapping that holds addr, from /proc/self/smaps."""
    cur = None
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if "-" in parts[0] and len(parts) > 1 and ":" not in parts[0]:
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            cur = lo <= addr < hi
        elif cur and parts[0] == "AnonHugePages:":
            return int(parts[1])
    return None


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    for f in ("/sys/kernel/mm/transparent_hugepage/enabled", "/proc/sys/vm/nr_hugepages"):
        try:
            print(f, open(f).read().strip())
        except OSError as e:
            print(f, e)
    k = w4mma.compiled(("probe_tlb",), lambda: SRC, "probe")
    n = 48
    offs = torch.tensor(OFFS, dtype=torch.int32, device=dev)
    out = torch.zeros(n, len(OFFS), dtype=torch.int64, device=dev)
    bufs = {}
    t = torch.ones(n * REGION + REGION, dtype=torch.uint8).pin_memory()
    bufs["pin_memory"] = (t.data_ptr() + REGION - 1) // REGION * REGION
    for name, huge in (("mmap+THP", True), ("mmap nohuge", False)):
        addr, rc, err = mmap_pinned(n * REGION, huge)
        print(f"{name}: madvise rc {rc}, cudaHostRegister {err}, AnonHugePages {thp_of(addr, n * REGION)} kB")
        bufs[name] = addr
    for name, addr in bufs.items():
        vals = {m: [] for m in NAMES}
        for rep in range(2):
            PDL.launch(k, (1, 1, 1), (1, 1, 1), [Ptr(addr), offs, len(OFFS), n, out], pdl=False)
            torch.cuda.synchronize()
            o = out.cpu()
            for j, m in enumerate(NAMES):
                vals[m] += o[:, j].tolist()
        print(f"{name:12s} " + "  ".join(f"{m} {statistics.median(v):5.0f}" for m, v in vals.items()) + "  (median ns; rep 2 "
              "re-reads the same lines)")


if __name__ == "__main__":
    main()
