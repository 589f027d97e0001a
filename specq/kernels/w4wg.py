"""W4A16 for 17..64 tokens (speculative verification) with Hopper warpgroup MMA (wgmma), as a CUDA C kernel
compiled at run time by NVRTC for sm_90a, on the few-token kernel's weight layout (w4mma.py: int32
[N/16, K/64, 32, 4] words, [N/16, K/128, 16] scale/zero words), so one copy of the int4 words serves every M.

Why: mma.sync caps a warp-level design near 50-60 us per Llama-3-8B layer at 64 tokens (kernels_w4a16_dev.txt run
12), and the Triton kernel takes ~116 us. wgmma m64nNk16 takes A (64 rows x 16 k) from registers and B (16 k x N
tokens) from shared memory: the dequantized weights never touch shared memory, and one x tile in shared memory
feeds every warpgroup of the CTA.

Work split: a CTA has WG warpgroups, each over RT 64-row blocks (warp q of a warpgroup: the 16-row tile q of each
block, exactly the w4mma tile whose words its lanes load), all over the same K slice of KBW 64-k blocks; K is
split over SPLIT CTAs (grid.y), partials summed by the last CTA of a row group in a fixed order (deterministic).
Per 64-k block: every thread copies its share of x [NTOK tokens, 64 k] into a stage in shared memory (cp.async,
4-byte pieces: the words permute k inside a block, see below), the warps dequantize their weights ((q - z) * s,
one rounding, as the Triton kernel) into A registers, and each warpgroup issues RT x 4 wgmma.

Shared-memory x tile of a stage: NTOK rows (tokens; rows >= M zero-filled) of 128 bytes, 128-byte swizzled
(16-byte chunk c of row m at chunk c ^ (m % 8); 1024-byte atoms of 8 rows), the canonical K-major B layout, so the
descriptor of k16 step j is the stage address + 32 j. Position L = 16 j + kappa of a row holds the x element the
words pair with lane (g, t)'s A register: kappa = 2 t + e -> k = 16 t + 4 j + e, kappa = 8 + 2 t + e ->
k = 16 t + 4 j + 2 + e (w4mma.repack_mma). stage_map() is this map in torch; the CPU tests check it against the
reference product.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import SpecqError
from . import w4mma

MAX_M = 64
_WG = r"""
__device__ __forceinline__ float ldcg(const float* p) {       // L2, not L1: other CTAs wrote it
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ void cpa4(u32 dst, const void* src, int bytes) {   // 4 B, zero-filled past `bytes`
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ unsigned long long xdesc(u32 addr) {  // K-major, 128-byte swizzle, 8-row groups 1024 B apart
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
WGMMA_FN
#define ROWS (64 * RT * WG)     // output rows per CTA
#define XSUB (NTOK * 128)       // bytes of one 64-k block of x in a stage
#define XST (KS * XSUB)         // bytes per x stage (KS blocks)
#define SX (DX + 2)             // x stages: DX copied ahead, the current one, the previous one (wgmma may read it)
#define SW (DW + 1)             // weight stages: DW copied ahead and the current one (each lane reads its own)
#define NW (WG * 4)             // warps
#define WT (KS * 512 + 64)      // bytes per 16-row tile and weight stage: its words of KS blocks, then 16 scale words
#define WST (RT * NW * WT)      // bytes per weight stage
#define RSTEP (4 * WG)          // token rows apart of one thread's x copies
#define NCP (NTOK / RSTEP)      // x copies (4 bytes) per thread per block
// grid (N / ROWS, SPLIT), block WG * 128, dynamic shared memory SX * XST + SW * WST + SW * NW * 8 + 1024;
// x [M, KD] contiguous. Weights: each warp bulk-copies (TMA, cp.async.bulk) its own row tiles' words and scale
// words of a stage into shared memory, completing on its own mbarrier of that stage slot; x: cp.async groups.
// ws: fp32 [SPLIT, M, N] partials (SPLIT > 1); locks: int32 [>= N / ROWS], zero between launches
extern "C" __global__ void __launch_bounds__(WG * 128, MINB)
w4wg(const uint4* __restrict__ qw, const u32* __restrict__ sz, const u16* __restrict__ x, u16* __restrict__ y,
     float* __restrict__ ws, int* __restrict__ locks, int M, int N, int K, int sxm, int sym)
{
    extern __shared__ __align__(1024) unsigned char xsm[];
    const u32 xs0 = ((u32)__cvta_generic_to_shared(xsm) + 1023u) & ~1023u;
    const u32 ws0 = xs0 + SX * XST, mb0 = ws0 + SW * WST;
#if PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    constexpr int KB = KD >> 6;
    constexpr int NS = KBW / KS;                                 // stages of this CTA
    const int kb0 = blockIdx.y * KBW;                            // first 64-k block of this CTA's K slice
    int tile[RT];
    const uint4* wp[RT];
    const u32* sp[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        tile[r] = (blockIdx.x * ROWS + ((warp >> 2) * RT + r) * 64) / 16 + (warp & 3);
        wp[r] = qw + ((size_t)tile[r] * KB + kb0) * 32;                 // the tile's words from block kb0 on
        sp[r] = sz + ((size_t)tile[r] * (KB >> 1) + (kb0 >> 1)) * 16;   // its scale words from group kb0 / 2 on
    }
    // in a weight stage, row tile r of this warp: words of block kk at wtile + r * WT + kk * 512 (lane's 16 B at
    // + lane * 16), scale words of rows g, g + 8 at wtile + r * WT + KS * 512 + 4 g, + 32
    const u32 wtile = (u32)(warp * RT * WT);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < SW; i++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(mb0 + (u32)(i * NW + warp) * 8));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    // x copies: thread (m0 = tid / 32, p = tid % 32) copies the 4 bytes at k 2p .. 2p+1 of token rows m0 + RSTEP i
    // to slot L = 16 j + 8 c + 2 t' (k = 16 t' + 4 j + 2 c) of the row: 16-byte chunk 2 j + c, XOR the row % 8
    const int m0 = threadIdx.x >> 5, p = threadIdx.x & 31;
    const int chunk = ((p >> 1) & 3) * 2 + (p & 1);
    const u32 dsw0 = (u32)(m0 * 128 + ((chunk ^ (m0 & 7)) << 4) + (p >> 3) * 4);
    const u32 dsw1 = (u32)((m0 + 4) * 128 + ((chunk ^ ((m0 + 4) & 7)) << 4) + (p >> 3) * 4);   // RSTEP = 4: odd i
    const int nv = M > m0 ? (M - m0 + RSTEP - 1) / RSTEP : 0;    // copies of real tokens (rows >= M: left as is,
                                                                 // they only feed discarded output columns)
    const u16* xg = x + (size_t)m0 * KD + (size_t)kb0 * 64 + 2 * p;
#define STAGE(blk, st) { \
    const u32 db = xs0 + (u32)(st) * XST + (u32)((blk) % KS) * XSUB; \
    const u16* sb_ = xg + (size_t)(blk) * 64; \
    STAGE_COPIES }
#define STAGE_X(sidx) { for (int kk = 0; kk < KS; kk++) STAGE((sidx) * KS + kk, (sidx) % SX) }
#define STAGE_W(sidx) if (lane == 0) { \
    const u32 slot = (u32)((sidx) % SW), mb = mb0 + (slot * NW + warp) * 8, wd = ws0 + slot * WST + wtile; \
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(mb), "n"(RT * WT) : "memory"); \
    _Pragma("unroll") for (int r = 0; r < RT; r++) { \
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" \
                     :: "r"(wd + r * WT), "l"(wp[r] + (size_t)(sidx) * KS * 32), "n"(KS * 512), "r"(mb) : "memory"); \
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 64, [%2];" \
                     :: "r"(wd + r * WT + KS * 512), "l"(sp[r] + (size_t)(sidx) * (KS / 2) * 16), "r"(mb) : "memory"); } }
#pragma unroll
    for (int i = 0; i < DW; i++) {                               // weights of stages 0 .. DW-1
        if (i < NS) STAGE_W(i)
    }
#pragma unroll
    for (int i = 0; i < DX; i++) {                               // x of stages 0 .. DX-1, one group each
        if (i < NS) STAGE_X(i)
        asm volatile("cp.async.commit_group;");
    }
    float acc[RT][NTOK / 2];
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int c = 0; c < NTOK / 2; c++) acc[r][c] = 0.f;
    u32 a[DB + 1][RT][4][4];          // A registers: DB = 1 double-buffers them (block b's dequant beside b-1's wgmma)
#pragma unroll 1
    for (int s0 = 0; s0 < NS; s0 += 2) {
#pragma unroll
    for (int si = 0; si < 2; si++) {
        const int sidx = s0 + si;
        if (NS % 2 && sidx >= NS) break;
        asm volatile("cp.async.wait_group %0;" :: "n"(DX - 1));   // this thread's x copies of stage sidx landed
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // cp.async writes -> visible to wgmma
        __syncthreads();              // every thread's x copies of stage sidx; stages <= sidx - 1 done with (weights:
                                      // every lane's reads; x: every wgmma but those of the last block)
        if (sidx + DW < NS) STAGE_W(sidx + DW)
        if (sidx + DX < NS) STAGE_X(sidx + DX)
        asm volatile("cp.async.commit_group;");
        const u32 wst = ws0 + (u32)(sidx % SW) * WST + wtile;
        asm volatile("{\n.reg .pred P1;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n@P1 bra DONE;\n"
                     "bra WAIT;\nDONE:\n}" :: "r"(mb0 + (u32)((sidx % SW) * NW + warp) * 8), "r"((sidx / SW) & 1) : "memory");
        u32 s[RT][2];
#pragma unroll
        for (int r = 0; r < RT; r++) {
            asm volatile("ld.shared.u32 %0, [%1];" : "=r"(s[r][0]) : "r"(wst + r * WT + KS * 512 + 4 * g));
            asm volatile("ld.shared.u32 %0, [%1];" : "=r"(s[r][1]) : "r"(wst + r * WT + KS * 512 + 4 * g + 32));
        }
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
        const int ab = DB ? (kk & 1) : 0;
#pragma unroll
        for (int r = 0; r < RT; r++) {
            uint4 w;
            asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                         : "r"(wst + r * WT + kk * 512 + lane * 16));
            const u32 nzg = (s[r][0] & 0xFFFFu) * 0x10001u, nzh = (s[r][1] & 0xFFFFu) * 0x10001u;
            const u32 sg = (s[r][0] >> 16) * 0x10001u, sh = (s[r][1] >> 16) * 0x10001u;
            const u32 wj[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                a[ab][r][j][0] = deqs(wj[j], nzg, sg);
                a[ab][r][j][1] = deqs(wj[j] >> 4, nzh, sh);
                a[ab][r][j][2] = deqs(wj[j] >> 8, nzg, sg);
                a[ab][r][j][3] = deqs(wj[j] >> 12, nzh, sh);
            }
        }
        const u32 st = xs0 + (u32)(sidx % SX) * XST + (u32)kk * XSUB;
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                wgmma(acc[r], a[ab][r][j][0], a[ab][r][j][1], a[ab][r][j][2], a[ab][r][j][3], xdesc(st + 32 * j));
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(DB) : "memory");
        }
    }
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
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
    if (SPLIT == 1) {
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int n = 0; n < NTOK / 8; n++)
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    const int row = tile[r] * 16 + g + 8 * (c >> 1), tok = 8 * n + 2 * t + (c & 1);
                    if (tok < M) y[(size_t)tok * sym + row] = to16(acc[r][4 * n + c]);
                }
        return;
    }
    float* part = ws + (size_t)blockIdx.y * M * N;
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int n = 0; n < NTOK / 8; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int row = tile[r] * 16 + g + 8 * (c >> 1), tok = 8 * n + 2 * t + (c & 1);
                if (tok < M) part[(size_t)tok * N + row] = acc[r][4 * n + c];
            }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(locks + blockIdx.x, 1) == SPLIT - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < M * ROWS; i += WG * 128) {     // coalesced over rows, fixed order over splits
        const int tok = i / ROWS, row = blockIdx.x * ROWS + i % ROWS;
        float v = 0.f;
        for (int q = 0; q < SPLIT; q++) v += ldcg(ws + ((size_t)q * M + tok) * N + row);
        y[(size_t)tok * sym + row] = to16(v);
    }
    if (threadIdx.x == 0) locks[blockIdx.x] = 0;
}
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
    DW: int = 4             # weight stages copied ahead (cp.async into shared memory, each lane its own words)
    DX: int = 1             # x stages copied ahead
    SPLIT: int = 0          # CTAs over K (0: enough for TARGET CTAs)
    TARGET: int = 132       # CTAs wanted when SPLIT = 0
    MINB: int = 2           # __launch_bounds__ min blocks per SM
    DB: int = 1             # double-buffered A registers
    KS: int = 2             # 64-k blocks per stage (one barrier per stage; one scale group)


def token_tile(M: int) -> int:
    """wgmma N: tokens rounded up to a multiple of 16."""
    return max(16, -(-M // 16) * 16)


def resolve(c: WgCfg, M: int, N: int, K: int) -> tuple[WgCfg, int]:
    """Concrete (cfg, KBW) for a shape, or SpecqError: ROWS divides N, every CTA gets an even number KBW of 64-k
    blocks that P divides."""
    rows = 64 * c.RT * c.WG
    KB = K // 64
    if M < 1 or M > MAX_M or N % rows or K % 128 or c.DX < 1 or c.DW < c.DX or c.KS != 2:
        raise SpecqError(f"w4wg: M={M} N={N} K={K} not supported by {c} (N % {rows}, K % 128, M <= {MAX_M})")
    split = c.SPLIT
    if split == 0:      # the fewest splits giving >= 90% of TARGET CTAs with KBW % 4 == 0 (else % 2), KBW >= 8
        cands = [s for s in range(1, KB // 8 + 1) if KB % (2 * s) == 0] or [1]
        split = next((s for s in cands if (N // rows) * s >= 0.9 * c.TARGET and (KB // s) % 4 == 0),
                     next((s for s in cands if (N // rows) * s >= 0.9 * c.TARGET), cands[-1]))
    if KB % (2 * split):
        raise SpecqError(f"w4wg: K={K} does not split {split} ways into whole 128-k groups")
    kbw = KB // split
    return c._replace(SPLIT=split), kbw


def default_config(M: int, N: int, K: int) -> WgCfg:
    for wg, rt in ((2, 1), (1, 1)):
        if N % (64 * wg * rt) == 0:
            return WgCfg(WG=wg, RT=rt)
    raise SpecqError(f"w4wg: N={N} is not a multiple of 64")


def supported(M: int, N: int, K: int) -> bool:
    try:
        resolve(default_config(M, N, K), M, N, K)
        return True
    except SpecqError:
        return False


def smem_bytes(c: WgCfg, ntok: int) -> int:
    tiles = 4 * c.RT * c.WG
    return (c.DX + 2) * c.KS * ntok * 128 + (c.DW + 1) * (tiles * (c.KS * 512 + 64) + c.WG * 4 * 8) + 1024


def source(c: WgCfg, ntok: int, KBW: int, fp16: bool, pdl: bool = False, dump: bool = False, K: int = 4096,
           full: bool = False) -> str:
    """The kernel's CUDA C for one resolved configuration (K: the row length of x and the weight; full: M == ntok,
    every token row copied without a bounds check)."""
    magic, ht, et = ("0x64006400", "f16x2", "f16") if fp16 else ("0x43004300", "bf16x2", "bf16")
    head = (f"#define NTOK {ntok}\n#define RT {c.RT}\n#define WG {c.WG}\n#define KBW {KBW}\n#define DW {c.DW}\n#define DX {c.DX}\n"
            f"#define SPLIT {c.SPLIT}\n#define KS {c.KS}\n#define KD {K}\n#define MINB {c.MINB}\n#define DB {int(c.DB)}\n"
            f"#define PDL {int(pdl)}\n#define FULL {int(full)}\n#define DUMP {int(dump)}\n#define FP16 {int(fp16)}\n"
            f"#define MAGIC_STR \"{magic}\"\n#define HTYPE \"{ht}\"\n#define ETYPE \"{et}\"\n#define LDHINT \"\"\n")
    return head + w4mma.helpers(fp16) + _WG.replace("WGMMA_FN", wgmma_fn(ntok, et)).replace(
        "STAGE_COPIES", stage_copies(ntok, c.WG, K, full))


def stage_copies(ntok: int, wg: int, K: int, full: bool) -> str:
    """STAGE's NCP copies of one thread, unrolled with immediate offsets: copy i is token row m0 + RSTEP i (smem row
    offset and swizzle from dsw0 / dsw1, global offset RSTEP i K elements)."""
    rstep = 4 * wg
    out = []
    for i in range(ntok // rstep):
        cond = "" if full else f"if ({i} < nv) "
        dsw = "dsw0" if (rstep * i) % 8 == 0 else "dsw1"
        out.append(f'{cond}asm volatile("cp.async.ca.shared.global [%0+{((rstep * i) & ~7) * 128}], '
                   f'[%1+{rstep * i * K * 2}], 4;" :: "r"(db + {dsw}), "l"(sb_)); \\\n')
    return "".join(out)


def stage_map(ntok: int = 64) -> torch.Tensor:
    """int64 [ntok * 64]: for each bf16 slot of a stage (byte offset / 2), the flat index m * 64 + k of the x element
    the kernel's STAGE copies there (k inside the 64-k block). Every slot is written exactly once."""
    out = torch.full((ntok * 64,), -1, dtype=torch.int64)
    for m in range(ntok):
        for p in range(32):
            chunk = ((((p >> 1) & 3) * 2 + (p & 1)) ^ (m & 7))
            byte = m * 128 + chunk * 16 + (p >> 3) * 4
            out[byte // 2] = m * 64 + 2 * p
            out[byte // 2 + 1] = m * 64 + 2 * p + 1
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


def locks_for(w: w4mma.MMAWeight) -> torch.Tensor:
    """One zeroed int32 counter per 64 rows of the weight, kept per weight (allocated on the first, eager, call)."""
    key = (w.words.data_ptr(), str(w.words.device))
    hit = _LOCKS.get(key)
    if hit is None or hit[0] is not w.words:
        if torch.cuda.is_current_stream_capturing():
            raise SpecqError("w4wg: run the Linear once eagerly before capturing it")
        hit = _LOCKS[key] = (w.words, torch.zeros(w.N // 64, dtype=torch.int32, device=w.words.device))
    return hit[1]


def w4wg_linear(x: torch.Tensor, w: w4mma.MMAWeight, cfg: WgCfg | None = None, dump: bool = False) -> torch.Tensor:
    """x [M, K] (M <= 64, 16-bit, CUDA, sm_90) @ W^T -> [M, N]. dump: the raw accumulators instead (debugging)."""
    M, K = x.shape
    if K != w.K:
        raise SpecqError(f"w4wg: x {tuple(x.shape)} against weight K={w.K}")
    c, kbw = resolve(cfg or default_config(M, w.N, K), M, w.N, K)
    ntok = token_tile(M)
    if x.stride(-1) != 1 or (M > 1 and x.stride(0) != K) or x.data_ptr() % 16:
        x = x.contiguous().clone()
    y = torch.empty(M, w.N, dtype=x.dtype, device=x.device)
    grid = (w.N // (64 * c.RT * c.WG), c.SPLIT, 1)
    if dump:
        ws = torch.zeros(grid[0] * grid[1] * c.RT * c.WG * 128 * ntok // 2, dtype=torch.float32, device=x.device)
    else:
        ws = torch.empty(c.SPLIT, M, w.N, dtype=torch.float32, device=x.device) if c.SPLIT > 1 else y
    locks = locks_for(w)
    with torch.cuda.device(x.device):
        k = kernel(c, ntok, kbw, K, w.fp16, x.device.index or 0, False, dump, M == ntok)
        k(grid=grid, block=(c.WG * 128, 1, 1), args=[w.words, w.sz, x, y, ws, locks, M, w.N, K, x.stride(0), y.stride(0)],
          shared_mem=smem_bytes(c, ntok))
    return ws if dump else y
