"""W4A16 for 17..64 tokens (speculative verification) with Hopper warpgroup MMA (wgmma), as a CUDA C kernel
compiled at run time by NVRTC for sm_90a, on its own word layout (repack_wg: the w4mma layout with k in natural
order inside each 64-k block) and w4mma's scale/zero words.

Why: mma.sync caps a warp-level design near 50-60 us per Llama-3-8B layer at 64 tokens (kernels_w4a16_dev.txt run
12), and the Triton kernel takes ~116 us. wgmma m64nNk16 takes A (64 rows x 16 k) from registers and B (16 k x N
tokens) from shared memory: the dequantized weights never touch shared memory, and one x tile in shared memory
feeds every warpgroup of the CTA.

Work split: a CTA has WG warpgroups, each over RT 64-row blocks (warp q of a warpgroup: the 16-row tile q of each
block), all over the same K slice of KBW 64-k blocks; K is split over SPLIT CTAs (grid.y), partials summed by the
last CTA of a row group in a fixed order (deterministic). Per 64-k block: the lanes load their own 16 bytes of words
P blocks ahead into registers (a ring, as w4mma), dequantize them ((q - z) * s, one rounding, as the Triton kernel)
into A registers, and each warpgroup issues RT x 4 wgmma; x goes through S shared-memory stages of KS blocks
(cp.async, 16 bytes, S - 2 stages ahead, one barrier per stage). The output tile goes through shared memory so
that y (or the split's partial) is stored coalesced.

Shared-memory x tile of a block: NTOK rows (tokens; rows >= M are never read into an output) of 128 bytes,
128-byte swizzled (16-byte chunk c of row m at chunk c ^ (m % 8); 1024-byte atoms of 8 rows): the canonical K-major
B layout, so the descriptor of k16 step j is the tile address + 32 j. stage_map() and wgmma_b() model the copy and
the descriptor read in torch; the CPU tests check them and repack_wg against the reference product.
"""
from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import torch

from ..errors import SpecqError
from . import pdl as PDL
from . import w4mma

MAX_M = 64
_WG = r"""
DEVICE_FNS
#define ROWS (64 * RT * WG)     // output rows per CTA
#define XSUB (NTOK * 128)       // bytes of one 64-k block of x in a stage
#define XST (KS * XSUB)         // bytes per x stage (KS blocks)
#define RSTEP (16 * WG)         // token rows apart of one thread's copies
#define NCP ((NTOK + RSTEP - 1) / RSTEP)   // copies (16 bytes) per thread per block
// grid (N / ROWS, SPLIT), block WG * 128, dynamic shared memory S * XST + 1024; x [M, KD] contiguous
// ws: fp32 [SPLIT, M, N] partials (SPLIT > 1, not CL); locks: int32 [>= N / ROWS], zero between launches
#if CL       // split-K inside a cluster: the SPLIT CTAs of a row group (grid.y) are one thread block cluster
#define CLDIMS __cluster_dims__(1, SPLIT, 1)
#else
#define CLDIMS
#endif
extern "C" __global__ void CLDIMS __launch_bounds__(WG * 128, MINB)
w4wg(const uint4* __restrict__ qw, const u32* __restrict__ sz, const u16* __restrict__ x, u16* __restrict__ y,
     float* __restrict__ ws, int* __restrict__ locks, int M, int N, int K, int sxm, int sym)
{
    extern __shared__ __align__(1024) unsigned char xsm[];
    const u32 xs0 = ((u32)__cvta_generic_to_shared(xsm) + 1023u) & ~1023u;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    constexpr int KB = KD >> 6;
    const int kb0 = blockIdx.y * KBW;                            // first 64-k block of this CTA's K slice
    int tile[RT];
    const uint4* wp[RT];
    const u32* sp[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        tile[r] = (blockIdx.x * ROWS + ((warp >> 2) * RT + r) * 64) / 16 + (warp & 3);
        wp[r] = qw + ((size_t)tile[r] * KB + kb0) * 32 + lane;
        sp[r] = sz + ((size_t)tile[r] * (KB >> 1) + (kb0 >> 1)) * 16 + g;
    }
    // x copies (natural k order, the wg word layout): thread (m0 = tid / 8, c = tid % 8) copies the 16-byte chunk c
    // (k 8c .. 8c+7) of token rows m0 + RSTEP i to chunk c ^ (row % 8) of the row (RSTEP = WG * 16, a multiple of 8)
    const int m0 = threadIdx.x >> 3, cx = threadIdx.x & 7;
    const u32 dsw = (u32)(m0 * 128 + ((cx ^ (m0 & 7)) << 4));
    const int nv = M > m0 ? (M - m0 + RSTEP - 1) / RSTEP : 0;    // copies of real tokens (rows >= M: left as is,
                                                                 // they only feed discarded output columns)
    const u16* xg = x + (size_t)m0 * KD + (size_t)kb0 * 64 + 8 * cx;
#define STAGEP(src, blk, st) { \
    const u32 db = xs0 + (u32)(st) * XST + (u32)((blk) % KS) * XSUB + dsw; \
    const u16* sb_ = (src); \
    STAGE_COPIES }
#define STAGE(blk, st) STAGEP(xg + (size_t)(blk) * 64, blk, st)
#define STAGE_ALL(sidx) if (!(ABL & 4)) { for (int kk = 0; kk < KS; kk++) STAGE((sidx) * KS + kk, (sidx) % S) }
    constexpr int NS = KBW / KS;                                 // stages of this CTA
    float acc[RT][NTOK / 2];
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int c = 0; c < NTOK / 2; c++) acc[r][c] = 0.f;
    uint4 wb[P][RT];                  // weight ring: blocks b .. b+P-1 of every row tile
    u32 sb[P / 2][RT][2];             // their groups' scale/zero words (rows g, g + 8)
#pragma unroll
    for (int i = 0; i < P; i++)
#pragma unroll
        for (int r = 0; r < RT; r++) {
            if (i < KBW) {
                wb[i][r] = ldw(wp[r] + i * 32);
                if (i % 2 == 0) { sb[i / 2][r][0] = lds(sp[r] + (i / 2) * 16); sb[i / 2][r][1] = lds(sp[r] + (i / 2) * 16 + 8); }
            }
        }
#if PDL    // programmatic dependent launch: the weights above are constant; x is the previous kernel's output
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#pragma unroll
    for (int i = 0; i < S - 2; i++) {
        if (i < NS) STAGE_ALL(i)
        asm volatile("cp.async.commit_group;");
    }
    u32 s[RT][2];
    u32 a[DB + 1][RT][4][4];          // A registers: DB = 1 double-buffers them (block b's dequant beside b-1's wgmma)
    // running pointers, advanced once per P blocks (the unrolled loads use immediate offsets): x of block
    // c0 + (S - 2) KS (the next stage to copy), words and scale words of block c0 + P (the next ring loads)
    const u16* xn = xg + (size_t)(S - 2) * KS * 64;
    const uint4* wn[RT];
    const u32* sn[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) { wn[r] = wp[r] + P * 32; sn[r] = sp[r] + (P / 2) * 16; }
#pragma unroll 1
    for (int c0 = 0; c0 < KBW; c0 += P) {         // KBW % P == 0, P % KS == 0
#pragma unroll
    for (int i = 0; i < P; i++) {
        const int b = c0 + i;
        if (i % KS == 0) {
            const int sidx = b / KS;
            asm volatile("cp.async.wait_group %0;" :: "n"(S - 3));
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // cp.async writes -> wgmma reads
            __syncthreads();          // stage sidx copied by every thread; stages <= sidx - 2 read by every warpgroup
            if (sidx + S - 2 < NS && !(ABL & 4)) {
#pragma unroll
                for (int kk = 0; kk < KS; kk++) STAGEP(xn + (i + kk) * 64, (sidx + S - 2) * KS + kk, (sidx + S - 2) % S)
            }
            asm volatile("cp.async.commit_group;");
        }
        const int ab = DB ? (i & 1) : 0;
#pragma unroll
        for (int r = 0; r < RT; r++) {
            const uint4 w = wb[i][r];
            if (b + P < KBW && !(ABL & 8)) wb[i][r] = ldw(wn[r] + i * 32);
            if (i % 2 == 0) {
                s[r][0] = sb[i / 2][r][0];
                s[r][1] = sb[i / 2][r][1];
                if (b + P < KBW) {
                    sb[i / 2][r][0] = lds(sn[r] + (i / 2) * 16);
                    sb[i / 2][r][1] = lds(sn[r] + (i / 2) * 16 + 8);
                }
            }
            const u32 nzg = (s[r][0] & 0xFFFFu) * 0x10001u, nzh = (s[r][1] & 0xFFFFu) * 0x10001u;
            const u32 sg = (s[r][0] >> 16) * 0x10001u, sh = (s[r][1] >> 16) * 0x10001u;
            const u32 wj[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                if (ABL & 1) {
                    a[ab][r][j][0] = wj[j] ^ nzg; a[ab][r][j][1] = wj[j] ^ nzh;
                    a[ab][r][j][2] = wj[j] ^ sg; a[ab][r][j][3] = wj[j] ^ sh;
                    continue;
                }
                a[ab][r][j][0] = deqs(wj[j], nzg, sg);
                a[ab][r][j][1] = deqs(wj[j] >> 4, nzh, sh);
                a[ab][r][j][2] = deqs(wj[j] >> 8, nzg, sg);
                a[ab][r][j][3] = deqs(wj[j] >> 12, nzh, sh);
            }
        }
        const u32 st = xs0 + (u32)((b / KS) % S) * XST + (u32)(b % KS) * XSUB;
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (ABL & 2) acc[r][j] += __uint_as_float(a[ab][r][j][0] ^ a[ab][r][j][1] ^ a[ab][r][j][2] ^ a[ab][r][j][3]);
                else wgmma(acc[r], a[ab][r][j][0], a[ab][r][j][1], a[ab][r][j][2], a[ab][r][j][3], xdesc(st + 32 * j));
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(DB) : "memory");
    }
    xn += P * 64;
#pragma unroll
    for (int r = 0; r < RT; r++) { wn[r] += P * 32; sn[r] += (P / 2) * 16; }
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#if PDL    // the next kernel may launch once every CTA is past its main loop (earlier, its CTAs would take SM slots and
          // bandwidth from this grid's: 116.5 against 99.1 us per 8B layer at 64 tokens, kernels_w4a16_dev.txt run 17)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int c = 0; c < NTOK / 2; c++) asm volatile("" : "+f"(acc[r][c]) :: "memory");
    // lane (g, t) of warp q holds acc[r][4 n + c]: row 16 tile[r] + g + 8 (c / 2), token 8 n + 2 t + c % 2
#if DUMP
    for (int r = 0; r < RT; r++)
        for (int c = 0; c < NTOK / 2; c++)
            ws[(((size_t)blockIdx.y * gridDim.x + blockIdx.x) * RT + r) * (WG * 128 * NTOK / 2) + threadIdx.x * (NTOK / 2) + c] = acc[r][c];
    return;
#endif
    // the CTA's [NTOK tokens, ROWS rows] fp32 tile through shared memory (the x stages, every wgmma done), rows
    // padded by 4 floats (conflict-free), then stored coalesced: y (SPLIT = 1) or this split's partial
    __syncthreads();
OUTPUT_TILE
}
"""



# Device functions, shared with the warp-specialized experiment (bench/dev/w4wgws_exp.py).
DEVICE_FNS = r"""__device__ __forceinline__ float ldcg(const float* p) {       // L2, not L1: other CTAs wrote it
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ float4 ldcg4(const float* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned long long xdesc(u32 addr) {  // K-major, 128-byte swizzle, 8-row groups 1024 B apart
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
WGMMA_FN
"""

# The end of the kernel, shared with the warp-specialized experiment (bench/dev/w4wgws_exp.py; CTA_SYNC: its
# consumer warpgroups' barrier): the accumulators through shared memory, then y or this split's partial stored
# coalesced, and the last CTA of a row group reduces the partials in a fixed order.
OUTPUT_TILE = r"""    float* ot = (float*)(xsm + (xs0 - (u32)__cvta_generic_to_shared(xsm)));
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int n = 0; n < NTOK / 8; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int lrow = ((warp >> 2) * RT + r) * 64 + (warp & 3) * 16 + g + 8 * (c >> 1);
                ot[(8 * n + 2 * t + (c & 1)) * (ROWS + 4) + lrow] = acc[r][4 * n + c];
            }
    CTA_SYNC();
    const int row0 = blockIdx.x * ROWS;
    if (SPLIT == 1) {
        for (int i = threadIdx.x; i < M * (ROWS / 2); i += WG * 128) {   // two rows (4 bytes of y) per store
            const int tok = i / (ROWS / 2), lr = 2 * (i % (ROWS / 2));
            const float* o = ot + tok * (ROWS + 4) + lr;
            *(u32*)(y + (size_t)tok * sym + row0 + lr) = (u32)to16(o[0]) | ((u32)to16(o[1]) << 16);
        }
        return;
    }
#if CL
    // every CTA of the cluster sums its share of the tile over the cluster's shared-memory tiles (DSMEM), ranks in
    // a fixed order: no global partials, counters or fences
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    {
        u32 rank;
        asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
        const u32 ob = (u32)__cvta_generic_to_shared(ot);
        for (int i = threadIdx.x + rank * (WG * 128); i < M * (ROWS / 4); i += WG * 128 * SPLIT) {
            const int tok = i / (ROWS / 4), lr = 4 * (i % (ROWS / 4));
            const u32 la = ob + (u32)(tok * (ROWS + 4) + lr) * 4u;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int q = 0; q < SPLIT; q++) {
                u32 ra;
                float4 u;
                asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(la), "r"(q));
                asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];"
                             : "=f"(u.x), "=f"(u.y), "=f"(u.z), "=f"(u.w) : "r"(ra) : "memory");
                v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
            }
            *(uint2*)(y + (size_t)tok * sym + row0 + lr) = make_uint2((u32)to16(v.x) | ((u32)to16(v.y) << 16),
                                                                      (u32)to16(v.z) | ((u32)to16(v.w) << 16));
        }
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    return;   // (the cluster's tiles stay readable until every CTA has passed the second barrier)
#endif
    float* part = ws + (size_t)blockIdx.y * M * N;
    for (int i = threadIdx.x; i < M * (ROWS / 4); i += WG * 128) {       // four rows (16 bytes) per store
        const int tok = i / (ROWS / 4), lr = 4 * (i % (ROWS / 4));
        *(float4*)(part + (size_t)tok * N + row0 + lr) = *(const float4*)(ot + tok * (ROWS + 4) + lr);
    }
    __threadfence();
    CTA_SYNC();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(locks + blockIdx.x, 1) == SPLIT - 1;
    CTA_SYNC();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < M * (ROWS / 4); i += WG * 128) {   // 4 rows per thread, fixed order over splits
        const int tok = i / (ROWS / 4), row = row0 + 4 * (i % (ROWS / 4));
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int q = 0; q < SPLIT; q++) {
            const float4 u = ldcg4(ws + ((size_t)q * M + tok) * N + row);
            v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
        }
        *(uint2*)(y + (size_t)tok * sym + row) = make_uint2((u32)to16(v.x) | ((u32)to16(v.y) << 16),
                                                            (u32)to16(v.z) | ((u32)to16(v.w) << 16));
    }
    if (threadIdx.x == 0) locks[blockIdx.x] = 0;
"""


def wgmma_fn(ntok: int, etype: str) -> str:
    """The device function issuing one wgmma.m64n{ntok}k16 (f32 accumulators d[ntok / 2], A from 4 registers)."""
    nd = ntok // 2
    dl = ",".join(f"%{i}" for i in range(nd))
    al = ",".join(f"%{nd + i}" for i in range(4))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    return (
        "__device__ __forceinline__ void wgmma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, unsigned long long desc) {\n"
        f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nd + 5}, 0;\\n"\n'
        f'        "wgmma.mma_async.sync.aligned.m64n{ntok}k16.f32.{etype}.{etype} {{{dl}}}, {{{al}}}, %{nd + 4}, p, 1, 1, 0;\\n}}\\n"\n'
        f'        : {outs}\n'
        '        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1) : "memory");\n'
        "}\n")


class WgCfg(NamedTuple):
    WG: int = 2             # warpgroups per CTA
    RT: int = 1             # 64-row blocks per warpgroup (each x tile feeds RT x 4 wgmma)
    P: int = 4              # 64-k weight blocks in flight per warp and row tile (register ring)
    S: int = 4              # x stages in shared memory (S - 2 stages copied ahead)
    SPLIT: int = 0          # CTAs over K (0: enough for TARGET CTAs)
    TARGET: int = 132       # CTAs wanted when SPLIT = 0
    MINB: int = 2           # __launch_bounds__ min blocks per SM
    DB: int = 1             # double-buffered A registers
    KS: int = 2             # 64-k blocks per x stage (one barrier per stage)
    ABL: int = 0            # timing ablations only (wrong results): 1 no dequant, 2 no wgmma, 4 no x copies,
                            # 8 no weight loads
    CL: int = 0             # 1: the SPLIT (2..8) CTAs of a row group are a cluster and reduce through shared memory


def token_tile(M: int) -> int:
    """wgmma N: tokens rounded up to a multiple of 16."""
    return max(16, -(-M // 16) * 16)


def resolve(c: WgCfg, M: int, N: int, K: int) -> tuple[WgCfg, int]:
    """Concrete (cfg, KBW) for a shape, or SpecqError: ROWS divides N, every CTA gets an even number KBW of 64-k
    blocks that P divides."""
    rows = 64 * c.RT * c.WG
    KB = K // 64
    if M < 1 or M > MAX_M or N % rows or K % 128 or c.S < 3 or c.P % 2 or c.KS not in (1, 2, 4):
        raise SpecqError(f"w4wg: M={M} N={N} K={K} not supported by {c} (N % {rows}, K % 128, M <= {MAX_M})")
    split = c.SPLIT
    if split == 0:      # the fewest splits giving >= 90% of TARGET CTAs with KBW % 4 == 0 (else % 2), KBW >= 8
        cands = [s for s in range(1, KB // 8 + 1) if KB % (2 * s) == 0] or [1]
        split = next((s for s in cands if (N // rows) * s >= 0.9 * c.TARGET and (KB // s) % 4 == 0),
                     next((s for s in cands if (N // rows) * s >= 0.9 * c.TARGET), cands[-1]))
    if KB % (2 * split):
        raise SpecqError(f"w4wg: K={K} does not split {split} ways into whole 128-k groups")
    kbw = KB // split
    p = max(2, min(c.P, kbw))
    while kbw % p or p % 2:
        p -= 1
    if kbw % c.KS or p % c.KS:
        raise SpecqError(f"w4wg: {kbw} blocks per CTA do not fill stages of {c.KS} blocks")
    return c._replace(SPLIT=split, P=p, CL=int(bool(c.CL) and 2 <= split <= 8)), kbw


def default_config(M: int, N: int, K: int) -> WgCfg:
    """One warpgroup per CTA. Fitted on the H100 (bench/dev/wg_ab.py, kernels_w4a16_dev.txt runs 17-18, Llama-3-8B and
    70B layers at 17, 32, 64 tokens): wide N (gate_up, N >= 4 K) two 64-row blocks per warpgroup over the whole K;
    long K (down, K >= 3 N) the same, K split for ~2 CTAs per SM; otherwise (qkv, o) one 64-row block, K split for
    ~2 CTAs per SM and reduced inside a cluster, 3 x stages over 32 tokens (4 CTAs per SM by shared memory)."""
    if N % 128 == 0 and (N >= 4 * K or K >= 3 * N):
        return WgCfg(WG=1, RT=2, MINB=2, TARGET=132 if N >= 4 * K else 264)
    if N % 64 == 0:
        return WgCfg(WG=1, RT=1, MINB=4, S=3 if M > 32 else 4, TARGET=264, CL=1)
    raise SpecqError(f"w4wg: N={N} is not a multiple of 64")


def usable(qweight: torch.Tensor, N: int, K: int, group_size) -> bool:
    """Keep this kernel's layout for a weight: a CUDA tensor on an sm_90 GPU (the code is compiled for sm_90a),
    NVRTC present, not SPECQ_W4_WG=0; N % 64 == 0, K % 128 == 0, groups of a multiple of 128. (prepare_w4a16 asks
    only when it keeps both other layouts: this is a third copy of the words.)"""
    if not qweight.is_cuda or not w4mma.available() or os.environ.get("SPECQ_W4_WG", "1") == "0":
        return False
    G = K if group_size in (None, -1, 0) else int(group_size)
    return (torch.cuda.get_device_capability(qweight.device) == (9, 0) and N % 64 == 0 and K % 128 == 0
            and G % 128 == 0)


def supported(M: int, N: int, K: int) -> bool:
    try:
        resolve(default_config(M, N, K), M, N, K)
        return True
    except SpecqError:
        return False


def smem_bytes(c: WgCfg, ntok: int) -> int:
    """x stages, which also hold the output tile [ntok, rows + 4] fp32 at the end, and the 1024-byte alignment."""
    return max(c.S * c.KS * ntok * 128, ntok * (64 * c.RT * c.WG + 4) * 4) + 1024


def source(c: WgCfg, ntok: int, KBW: int, fp16: bool, pdl: bool = False, dump: bool = False, K: int = 4096,
           full: bool = False) -> str:
    """The kernel's CUDA C for one resolved configuration (K: the row length of x and the weight; full: M == ntok,
    every token row copied without a bounds check)."""
    magic, ht, et = ("0x64006400", "f16x2", "f16") if fp16 else ("0x43004300", "bf16x2", "bf16")
    head = (f"#define NTOK {ntok}\n#define RT {c.RT}\n#define WG {c.WG}\n#define KBW {KBW}\n#define P {c.P}\n"
            f"#define SPLIT {c.SPLIT}\n#define S {c.S}\n#define KS {c.KS}\n#define KD {K}\n#define MINB {c.MINB}\n#define DB {int(c.DB)}\n"
            f"#define ABL {c.ABL}\n#define CL {c.CL}\n#define PDL {int(pdl)}\n#define FULL {int(full)}\n#define DUMP {int(dump)}\n#define FP16 {int(fp16)}\n"
            f"#define MAGIC_STR \"{magic}\"\n#define HTYPE \"{ht}\"\n#define ETYPE \"{et}\"\n#define LDHINT \"\"\n")
    body = (_WG.replace("DEVICE_FNS", DEVICE_FNS).replace("WGMMA_FN", wgmma_fn(ntok, et))
            .replace("STAGE_COPIES", stage_copies(ntok, c.WG, K, full))
            .replace("OUTPUT_TILE", "#define CTA_SYNC() __syncthreads()\n" + OUTPUT_TILE))
    return head + w4mma.helpers(fp16) + body


def stage_copies(ntok: int, wg: int, K: int, full: bool) -> str:
    """STAGE's copies of one thread, unrolled with immediate offsets: copy i is token row m0 + RSTEP i (RSTEP = 16 WG
    rows, a multiple of 8: the same swizzle), 16 bytes."""
    rstep = 16 * wg
    out = []
    for i in range(-(-ntok // rstep)):
        cond = "" if full and rstep * (i + 1) <= ntok else f"if ({i} < nv) "
        out.append(f'{cond}asm volatile("cp.async.cg.shared.global [%0+{rstep * i * 128}], [%1+{rstep * i * K * 2}], 16;" '
                   f':: "r"(db), "l"(sb_)); \\\n')
    return "".join(out)


def stage_map(ntok: int = 64) -> torch.Tensor:
    """int64 [ntok * 64]: for each 16-bit slot of a stage (byte offset / 2), the flat index m * 64 + k of the x element
    the kernel's STAGE copies there (k inside the 64-k block): chunk c of row m at chunk c ^ (m % 8)."""
    out = torch.full((ntok * 64,), -1, dtype=torch.int64)
    for m in range(ntok):
        for c in range(8):
            for u in range(8):
                out[(m * 128 + ((c ^ (m % 8)) << 4) + 2 * u) // 2] = m * 64 + 8 * c + u
    return out


def wgmma_b(stage: torch.Tensor, j: int, ntok: int) -> torch.Tensor:
    """The B operand [16 k, ntok] that wgmma reads for k16 step j from a stage [ntok * 64] laid out as the
    descriptor says (K-major, 128-byte swizzle): element (kappa, n) at byte n * 128 + ((2 (16 j + kappa)) with its
    16-byte chunk index XOR n % 8)."""
    B = torch.empty(16, ntok, dtype=stage.dtype)
    for n in range(ntok):
        for kap in range(16):
            byte = 2 * (16 * j + kap)
            chunk, within = byte // 16, byte % 16
            B[kap, n] = stage[(n * 128 + ((chunk ^ (n % 8)) << 4) + within) // 2]
    return B


_LOCKS: dict = {}


def kernel(c: WgCfg, ntok: int, KBW: int, K: int, fp16: bool, device: int = 0, pdl: bool = False, dump: bool = False,
           full: bool = False):
    k = w4mma.compiled(("w4wg", c, ntok, KBW, K, fp16, device, pdl, dump, full),
                       lambda: source(c, ntok, KBW, fp16, pdl, dump, K, full), "w4wg", arch="90a")
    shm = smem_bytes(c, ntok)
    if shm > 48 * 1024 and getattr(k, "_specq_shm", 0) < shm:
        k.set_shared_memory_config(shm)          # opt in beyond 48 KB (once per kernel)
        k._specq_shm = shm
    return k


WGWeight = w4mma.MMAWeight   # words in the natural-k layout (repack_wg), w4mma's scale/zero words


def repack_wg(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical qweight [N, K//8] -> words [N/16, K/64, 32, 4]: lane (g, t) of block (tile, b), word j = the wgmma
    A fragment of k16 step j in natural k order: nibble i (bits 4i) and nibble i of the high half (bits 16 + 4i) are
    the 16-bit pair of register a_i, row 16 tile + g + 8 (i % 2), k = 64 b + 16 j + 8 (i // 2) + 2 t + e."""
    return w4mma.repack_mma(qweight, natural_k=True)


def prepare_wg(qweight, scales, zeros, group_size=None, dtype=torch.bfloat16) -> WGWeight:
    """The kernel's weight: repack_wg words and the w4mma scale/zero words (w4mma's limits, and N % 64 == 0)."""
    return w4mma.prepare_mma(qweight, scales, zeros, group_size, dtype, natural_k=True, row_multiple=64, name="w4wg")


def locks_for(w: WGWeight) -> torch.Tensor:
    """One zeroed int32 counter per 64 rows of the weight, kept per weight (prepare_w4a16 allocates it; otherwise the
    first call must be eager)."""
    key = (w.words.data_ptr(), str(w.words.device))
    hit = _LOCKS.get(key)
    if hit is None or hit[0]() is not w.words:       # a weak reference: the table never keeps a weight alive
        if w.words.is_cuda and torch.cuda.is_current_stream_capturing():
            raise SpecqError("w4wg: run the Linear once eagerly before capturing it")
        hit = _LOCKS[key] = (weakref.ref(w.words, lambda _, k=key: _LOCKS.pop(k, None)),
                             torch.zeros(w.N // 64, dtype=torch.int32, device=w.words.device))
    return hit[1]


def w4wg_linear(x: torch.Tensor, w: WGWeight, cfg: WgCfg | None = None, dump: bool = False,
                pdl: bool = False) -> torch.Tensor:
    """x [M, K] (M <= 64, 16-bit, CUDA, sm_90) @ W^T -> [M, N]. dump: the raw accumulators instead (debugging).
    pdl: launched with programmatic dependent launch inside graph capture (off by default: 103.7 against 100.9 us
    per 8B layer at 64 tokens, kernels_w4a16_dev.txt run 17)."""
    M, K = x.shape
    if K != w.K:
        raise SpecqError(f"w4wg: x {tuple(x.shape)} against weight K={w.K}")
    c, kbw = resolve(cfg or default_config(M, w.N, K), M, w.N, K)
    ntok = token_tile(M)
    x = w4mma._aligned(x if M == 1 or x.stride(0) == K else x.contiguous())    # rows of exactly K elements
    y = torch.empty(M, w.N, dtype=x.dtype, device=x.device)
    grid = (w.N // (64 * c.RT * c.WG), c.SPLIT, 1)
    if dump:
        ws = torch.zeros(grid[0] * grid[1] * c.RT * c.WG * 128 * ntok // 2, dtype=torch.float32, device=x.device)
    else:
        ws = torch.empty(c.SPLIT, M, w.N, dtype=torch.float32, device=x.device) if c.SPLIT > 1 and not c.CL else y
    locks = locks_for(w)
    with torch.cuda.device(x.device):
        pdl = pdl and PDL.enabled(x.device)
        k = kernel(c, ntok, kbw, K, w.fp16, x.device.index or 0, pdl, dump, M == ntok)
        args = [w.words, w.sz, x, y, ws, locks, M, w.N, K, x.stride(0), y.stride(0)]
        block = (c.WG * 128, 1, 1)
        if pdl and torch.cuda.is_current_stream_capturing():
            PDL.launch(k, grid, block, args, shared_mem=smem_bytes(c, ntok))
        else:
            k(grid=grid, block=block, args=args, shared_mem=smem_bytes(c, ntok))
    return ws if dump else y
