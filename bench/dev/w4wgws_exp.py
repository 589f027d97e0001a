"""EXPERIMENT (not used by specq: correct but slower, kernels_w4a16_dev.txt run 17 step 8). The warp-specialized
variant of the wgmma W4A16 kernel (specq/kernels/w4wg.py): one producer warp fills SD shared-memory stages (x by
cp.async, counted on the stage's full mbarrier with cp.async.mbarrier.arrive; words and scale words by bulk copies
on the same barrier); the consumer warpgroups dequantize from shared memory, issue wgmma and release a stage on
its empty barrier once its wgmma are done. Same weights (w4wg.prepare_wg) and configs (w4wg.WgCfg) plus SD.
PYTHONPATH=$PWD python bench/dev/w4wgws_exp.py   (checks every shape against the reference, then times it)"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.errors import SpecqError  # noqa: E402
from specq.kernels import w4mma, w4wg  # noqa: E402

_WS = r"""
DEVICE_FNS
__device__ __forceinline__ void mbwait(u32 mb, u32 phase) {
    asm volatile("{\n.reg .pred P1;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n@P1 bra DONE;\n"
                 "bra WAIT;\nDONE:\n}" :: "r"(mb), "r"(phase) : "memory");
}
__device__ __forceinline__ void cbar() {          // the consumer warpgroups only (named barrier 1)
    asm volatile("bar.sync 1, %0;" :: "n"(WG * 128) : "memory");
}
#define ROWS (64 * RT * WG)     // output rows per CTA
#define NWC (4 * WG)            // consumer warps; warp NWC is the producer
#define XSUB (NTOK * 128)       // bytes of one 64-k block of x (128-byte swizzled rows)
#define XST (KS * XSUB)         // x bytes per stage
#define WT (KS * 512 + 64)      // bytes per 16-row tile and stage: its words of KS blocks, then its 16 scale words
#define WST (RT * NWC * WT)     // weight bytes per stage
// grid (N / ROWS, SPLIT), block WG * 128 + 32, dynamic shared memory SD * (XST + WST) + SD * 16 + 1024; x [M, KD]
// contiguous. Stages: the producer warp fills x (cp.async, 16-byte chunks, completion counted on the stage's full
// barrier by cp.async.mbarrier.arrive) and the words and scale words (lane 0: one bulk copy per tile, complete_tx on
// the same barrier); the consumer warpgroups wait on it, and every consumer thread arrives on the stage's empty
// barrier once the wgmma reading it are done.
extern "C" __global__ void __launch_bounds__(WG * 128 + 32, MINB)
w4wgws(const uint4* __restrict__ qw, const u32* __restrict__ sz, const u16* __restrict__ x, u16* __restrict__ y,
       float* __restrict__ ws, int* __restrict__ locks, int M, int N, int K, int sxm, int sym)
{
    extern __shared__ __align__(1024) unsigned char xsm[];
    const u32 xs0 = ((u32)__cvta_generic_to_shared(xsm) + 1023u) & ~1023u;
    const u32 ws0 = xs0 + SD * XST, fb0 = ws0 + SD * WST, eb0 = fb0 + SD * 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int KB = KD >> 6;
    constexpr int NS = KBW / KS;
    const int kb0 = blockIdx.y * KBW;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < SD; i++) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 33;" :: "r"(fb0 + i * 8));        // 32 lanes + lane 0's tx
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(eb0 + i * 8), "n"(WG * 128));
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == NWC) {                                       // ---- producer warp
        const int mq = lane >> 3, cx = lane & 7;             // chunk (m = mq + 4 i, c = cx) of every block
        const u16* xg = x + (size_t)mq * KD + (size_t)kb0 * 64 + 8 * cx;
        const u32 sw0 = (u32)(mq * 128 + ((cx ^ mq) << 4)), sw1 = (u32)((mq + 4) * 128 + ((cx ^ (mq + 4)) << 4));
        for (int s = 0; s < NS; s++) {
            const int slot = s % SD;
            if (s >= SD) mbwait(eb0 + slot * 8, ((s / SD) - 1) & 1);
            const u32 fb = fb0 + slot * 8;
            if (lane == 0) {
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(fb), "n"(WST) : "memory");
#pragma unroll 1
                for (int tt = 0; tt < RT * NWC; tt++) {      // tile of consumer warp w = tt / RT, row block r = tt % RT
                    const int w = tt / RT, r = tt % RT;
                    const int tile = (blockIdx.x * ROWS + ((w >> 2) * RT + r) * 64) / 16 + (w & 3);
                    const u32 dst = ws0 + slot * WST + tt * WT;
                    const uint4* src = qw + ((size_t)tile * KB + kb0 + s * KS) * 32;
                    const u32* ssrc = sz + ((size_t)tile * (KB >> 1) + (kb0 >> 1) + s * (KS / 2)) * 16;
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                                 :: "r"(dst), "l"(src), "n"(KS * 512), "r"(fb) : "memory");
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 64, [%2];"
                                 :: "r"(dst + KS * 512), "l"(ssrc), "r"(fb) : "memory");
                }
            }
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                const u32 db = xs0 + slot * XST + kk * XSUB;
                const u16* src = xg + (size_t)(s * KS + kk) * 64;
#pragma unroll
                for (int i = 0; i < NTOK / 4; i++)
                    if (mq + 4 * i < M)
                        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                                     :: "r"(db + (i & 1 ? sw1 : sw0) + (u32)((4 * i) & ~7) * 128),
                                        "l"(src + (size_t)4 * i * KD));
            }
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(fb) : "memory");
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
        return;
    }
    // ---- consumer warpgroups
    const int g = lane >> 2, t = lane & 3;
    int tile[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) tile[r] = (blockIdx.x * ROWS + ((warp >> 2) * RT + r) * 64) / 16 + (warp & 3);
    float acc[RT][NTOK / 2];
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int c = 0; c < NTOK / 2; c++) acc[r][c] = 0.f;
    u32 a[2][RT][4][4];
#pragma unroll 1
    for (int s = 0; s < NS; s++) {
        const int slot = s % SD;
        mbwait(fb0 + slot * 8, (s / SD) & 1);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // the cp.async x writes -> wgmma's reads
        const u32 wst = ws0 + slot * WST + warp * RT * WT;
        u32 sc[RT][2];
#pragma unroll
        for (int r = 0; r < RT; r++) {
            asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sc[r][0]) : "r"(wst + r * WT + KS * 512 + 4 * g));
            asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sc[r][1]) : "r"(wst + r * WT + KS * 512 + 4 * g + 32));
        }
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
#pragma unroll
            for (int r = 0; r < RT; r++) {
                uint4 w;
                asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                             : "r"(wst + r * WT + kk * 512 + lane * 16));
                const u32 nzg = (sc[r][0] & 0xFFFFu) * 0x10001u, nzh = (sc[r][1] & 0xFFFFu) * 0x10001u;
                const u32 sg = (sc[r][0] >> 16) * 0x10001u, sh = (sc[r][1] >> 16) * 0x10001u;
                const u32 wj[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    a[kk & 1][r][j][0] = deqs(wj[j], nzg, sg);
                    a[kk & 1][r][j][1] = deqs(wj[j] >> 4, nzh, sh);
                    a[kk & 1][r][j][2] = deqs(wj[j] >> 8, nzg, sg);
                    a[kk & 1][r][j][3] = deqs(wj[j] >> 12, nzh, sh);
                }
            }
            const u32 st = xs0 + slot * XST + kk * XSUB;
            asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    wgmma(acc[r], a[kk & 1][r][j][0], a[kk & 1][r][j][1], a[kk & 1][r][j][2], a[kk & 1][r][j][3],
                          xdesc(st + 32 * j));
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
            if (kk == 0 && s > 0)     // every wgmma of stage s - 1 done: its slot may be refilled
                asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(eb0 + ((s - 1) % SD) * 8) : "memory");
        }
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int c = 0; c < NTOK / 2; c++) asm volatile("" : "+f"(acc[r][c]) :: "memory");
    cbar();                           // every consumer's wgmma done (the producer's copies all consumed: none in flight)
OUTPUT_TILE
}
"""


def smem_bytes(c: w4wg.WgCfg, sd: int, ntok: int) -> int:
    """SD stages of x (which also hold the output tile at the end) and words, two mbarriers per stage, alignment."""
    xb = sd * c.KS * ntok * 128
    return max(xb, ntok * (64 * c.RT * c.WG + 4) * 4) + sd * (c.RT * c.WG * 4 * (c.KS * 512 + 64) + 16) + 1024


def source(c: w4wg.WgCfg, sd: int, ntok: int, kbw: int, fp16: bool, K: int) -> str:
    base = w4wg.source(c, ntok, kbw, fp16, K=K)
    head = base[:base.index("typedef unsigned int u32;")] + f"#define SD {sd}\n"
    magic, ht, et = ("0x64006400", "f16x2", "f16") if fp16 else ("0x43004300", "bf16x2", "bf16")
    return head + w4mma.helpers(fp16) + _WS.replace("DEVICE_FNS", w4wg.DEVICE_FNS).replace(
        "WGMMA_FN", w4wg.wgmma_fn(ntok, et)).replace(
        "OUTPUT_TILE", "#define CTA_SYNC() cbar()\n" + w4wg.OUTPUT_TILE)


def w4wgws_linear(x: torch.Tensor, w: w4wg.WGWeight, c: w4wg.WgCfg, sd: int) -> torch.Tensor:
    """x [M, K] (M <= 64, 16-bit, contiguous, CUDA sm_90) @ W^T -> [M, N] with the warp-specialized kernel."""
    M, K = x.shape
    if sd < 2 or c.KS != 2:
        raise SpecqError("w4wgws: SD >= 2 stages of 2 blocks")
    c, kbw = w4wg.resolve(c, M, w.N, K)
    ntok = w4wg.token_tile(M)
    x = x.contiguous()
    y = torch.empty(M, w.N, dtype=x.dtype, device=x.device)
    ws = torch.empty(c.SPLIT, M, w.N, dtype=torch.float32, device=x.device) if c.SPLIT > 1 else y
    shm = smem_bytes(c, sd, ntok)
    with torch.cuda.device(x.device):
        k = w4mma.compiled(("w4wgws", c, sd, ntok, kbw, K, w.fp16, x.device.index or 0),
                           lambda: source(c, sd, ntok, kbw, w.fp16, K), "w4wgws", arch="90a")
        if shm > 48 * 1024 and getattr(k, "_specq_shm", 0) < shm:
            k.set_shared_memory_config(shm)
            k._specq_shm = shm
        k(grid=(w.N // (64 * c.RT * c.WG), c.SPLIT, 1), block=(c.WG * 128 + 32, 1, 1),
          args=[w.words, w.sz, x, y, ws, w4wg.locks_for(w), M, w.N, K, x.stride(0), y.stride(0)], shared_mem=shm)
    return y


@torch.inference_mode()
def main():
    from bench.check_kernels import MODELS
    from bench.kernels import graph_time
    from specq.kernels import ref
    g = torch.Generator().manual_seed(1)
    for name, K, N in MODELS["llama3-8b"]:
        q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
        w = w4wg.prepare_wg(q, s, z, 128)
        for m in (64, 32):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            r = x.float() @ ref.dequant_w4(q, s, z).float().T
            base = w4wg.default_config(m, N, K)
            row = [f"default {graph_time([lambda: w4wg.w4wg_linear(x, w)]):6.1f}"]
            for c, sd in ((w4wg.WgCfg(WG=2, MINB=1), 4), (w4wg.WgCfg(WG=2, MINB=2), 3), (base, 3)):
                y = w4wgws_linear(x, w, c, sd)
                e = ((y.float() - r).norm() / r.norm()).item()
                t = graph_time([lambda c=c, sd=sd: w4wgws_linear(x, w, c, sd)])
                row.append(f"WG{c.WG}RT{c.RT}SD{sd} {t:6.1f}{'' if e < 1e-2 else ' CHECK FAILED'}")
            print(f"M={m} {name:8s} " + " ".join(row), flush=True)


if __name__ == "__main__":
    main()
