"""EXPERIMENT (not used by specq: slower than the Triton kernel, see kernels_w4a16_dev.txt run 12). W4A16 for 17..64 tokens (speculative verification of chains and trees): a CUDA C kernel compiled at run time by
NVRTC, on the same weight layout as the few-token kernel (w4mma.py: int32 [N/16, K/64, 32, 4] words and
[N/16, K/128, 16] scale/zero words), so one copy of the int4 weights serves every M.

Why another kernel: at 64 tokens the few-token design (one CTA per 16 rows, warps over K) re-reads the whole
activation x [M, K] for every 16 rows: ~1.7 GB of L2 traffic per Llama-3-8B layer against 109 MB of weights.
Here a CTA covers WARPS * RT row tiles (256 rows by default) over one K slice:
  - each warp owns RT 16-row tiles, so every x fragment it loads feeds RT mma (x bytes per mma / RT);
  - the CTA's warps walk the same K slice in step, so their x loads (ld.global.nc, L1-cached) hit L1 after the
    first warp: x leaves L2 once per CTA, not once per warp;
  - K is split over SPLIT CTAs (grid.y) to fill the GPU; each writes an fp32 partial [M, rows] to a workspace,
    and the last CTA of a row group (an atomic counter per row group, reset by that CTA) sums the SPLIT
    partials in a fixed order (deterministic) and writes y.
Weights: P 64-k blocks in flight per warp and row tile (a register ring, as in w4mma.py), dequantized with the
group scale folded in ((q - z) * s, one rounding), then NT n8 token tiles of mma.m16n8k16 per 16 k.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from specq.errors import SpecqError
from specq.kernels import w4mma

MAX_M = 64
_WIDE = r"""
// qw: [N/16, K/64, 32, 4] words; sz: [N/16, K/128, 16]; x: [M, K] (row stride sxm); y: [M, N] (row stride sym)
// ws: fp32 [SPLIT, M, N] partials (SPLIT > 1); locks: int32 [>= N / (16 RT WARPS)], zero between launches
// grid (N / (16 RT WARPS), SPLIT), block WARPS * 32
__device__ __forceinline__ float ldcg(const float* p) {       // L2, not L1: other CTAs wrote it
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ void cpa(u32 dst, const void* src, int bytes) {   // 16 B, zero-filled past `bytes`
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes));
}
#define ROWS (NT * 8)           // token rows staged per block (tokens >= M zero-filled)
#define XSTR 144                // bytes per staged row: 128 of x + 16 of padding (conflict-free 16-byte reads)
extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)
w4wide(const uint4* __restrict__ qw, const u32* __restrict__ sz, const u16* __restrict__ x, u16* __restrict__ y,
       float* __restrict__ ws, int* __restrict__ locks, int M, int N, int K, int sxm, int sym)
{
    __shared__ __align__(16) unsigned char xs[S][ROWS * XSTR];   // x of blocks b .. b+S-1: [token][64 k]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int KB = K >> 6;
    const int kb0 = blockIdx.y * KBW;                            // first 64-k block of this CTA's K slice
    const int tile0 = (blockIdx.x * WARPS + warp) * RT;          // first 16-row tile of this warp
    const uint4* wp[RT];
    const u32* sp[RT];
#pragma unroll
    for (int r = 0; r < RT; r++) {
        wp[r] = qw + ((size_t)(tile0 + r) * KB + kb0) * 32 + lane;
        sp[r] = sz + ((size_t)(tile0 + r) * (KB >> 1) + (kb0 >> 1)) * 16 + g;
    }
    const u16* xg = x + (size_t)kb0 * 64;
    const u32 xs0 = (u32)__cvta_generic_to_shared(&xs[0][0]);
#define STAGE(blk, st) \
    for (int q = threadIdx.x; q < ROWS * 8; q += WARPS * 32) { \
        const int m = q >> 3, c = q & 7; \
        cpa(xs0 + (st) * (ROWS * XSTR) + m * XSTR + c * 16, xg + (size_t)(m < M ? m : 0) * sxm + (blk) * 64 + c * 8, \
            m < M ? 16 : 0); \
    }
#pragma unroll
    for (int i = 0; i < S - 1; i++) {
        if (i < KBW) { STAGE(i, i) }
        asm volatile("cp.async.commit_group;");
    }
    float acc[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[r][n][c] = 0.f;
    uint4 wb[P][RT];                  // weight ring: blocks b .. b+P-1 of every row tile
    u32 sb[P / 2][RT][2];             // their groups' scale/zero words (rows g, g + 8)
#pragma unroll
    for (int i = 0; i < P; i++)
#pragma unroll
        for (int r = 0; r < RT; r++) {
            wb[i][r] = ldw(wp[r] + i * 32);
            if (i % 2 == 0) { sb[i / 2][r][0] = lds(sp[r] + (i / 2) * 16); sb[i / 2][r][1] = lds(sp[r] + (i / 2) * 16 + 8); }
        }
    u32 s[RT][2];
#if ROLL
#pragma unroll 1
#else
#pragma unroll
#endif
    for (int c0 = 0; c0 < KBW; c0 += P) {         // KBW % P == 0
#pragma unroll
    for (int i = 0; i < P; i++) {
        const int b = c0 + i;
        asm volatile("cp.async.wait_group %0;" :: "n"(S - 2));
        __syncthreads();                          // block b staged; every warp is done with block b - 1's stage
        if (b + S - 1 < KBW) { STAGE(b + S - 1, (b + S - 1) % S) }
        asm volatile("cp.async.commit_group;");
        const unsigned char* xb = &xs[b % S][0] + g * XSTR + 32 * t;
        uint4 w[RT];
#pragma unroll
        for (int r = 0; r < RT; r++) {
            w[r] = wb[i][r];
            if (b + P < KBW) wb[i][r] = ldw(wp[r] + (b + P) * 32);
            if (i % 2 == 0) {
                s[r][0] = sb[i / 2][r][0];
                s[r][1] = sb[i / 2][r][1];
                if (b + P < KBW) {
                    sb[i / 2][r][0] = lds(sp[r] + ((b + P) / 2) * 16);
                    sb[i / 2][r][1] = lds(sp[r] + ((b + P) / 2) * 16 + 8);
                }
            }
        }
#pragma unroll
        for (int jp = 0; jp < 2; jp++) {            // mma steps j = 2 jp, 2 jp + 1
            u32 a[RT][2][4];
#pragma unroll
            for (int r = 0; r < RT; r++) {
                const u32 nzg = (s[r][0] & 0xFFFFu) * 0x10001u, nzh = (s[r][1] & 0xFFFFu) * 0x10001u;
                const u32 sg = (s[r][0] >> 16) * 0x10001u, sh = (s[r][1] >> 16) * 0x10001u;
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    const u32 wj = jp == 0 ? (jj == 0 ? w[r].x : w[r].y) : (jj == 0 ? w[r].z : w[r].w);
                    a[r][jj][0] = deqs(wj, nzg, sg);
                    a[r][jj][1] = deqs(wj >> 4, nzh, sh);
                    a[r][jj][2] = deqs(wj >> 8, nzg, sg);
                    a[r][jj][3] = deqs(wj >> 12, nzh, sh);
                }
            }
#pragma unroll
            for (int n = 0; n < NT; n++) {
                const uint4 v = *(const uint4*)(xb + n * 8 * XSTR + 16 * jp);   // token 8n + g, k 16t + 8jp .. + 7
#pragma unroll
                for (int r = 0; r < RT; r++) {
                    mma(acc[r][n], a[r][0][0], a[r][0][1], a[r][0][2], a[r][0][3], v.x, v.y);
                    mma(acc[r][n], a[r][1][0], a[r][1][1], a[r][1][2], a[r][1][3], v.z, v.w);
                }
            }
        }
    }
    }
    // lane (g, t) holds acc[r][n][c] of row 16 (tile0 + r) + g + 8 (c / 2), token 8 n + 2 t + c % 2
    if (SPLIT == 1) {
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    const int row = (tile0 + r) * 16 + g + 8 * (c >> 1), tok = 8 * n + 2 * t + (c & 1);
                    if (tok < M) y[(size_t)tok * sym + row] = to16(acc[r][n][c]);
                }
        return;
    }
    float* part = ws + (size_t)blockIdx.y * M * N;
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int row = (tile0 + r) * 16 + g + 8 * (c >> 1), tok = 8 * n + 2 * t + (c & 1);
                if (tok < M) part[(size_t)tok * N + row] = acc[r][n][c];
            }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(locks + blockIdx.x, 1) == SPLIT - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int row = (tile0 + r) * 16 + g + 8 * (c >> 1), tok = 8 * n + 2 * t + (c & 1);
                if (tok < M) {
                    float v = 0.f;
                    for (int q = 0; q < SPLIT; q++) v += ldcg(ws + ((size_t)q * M + tok) * N + row);
                    y[(size_t)tok * sym + row] = to16(v);
                }
            }
    if (threadIdx.x == 0) locks[blockIdx.x] = 0;
}
"""


class WideCfg(NamedTuple):
    RT: int = 2             # 16-row tiles per warp (x fragments reused RT times)
    WARPS: int = 8          # warps per CTA, each over other rows of the same K slice
    P: int = 4              # 64-k blocks in flight per warp and row tile
    SPLIT: int = 0          # CTAs over K (0: enough to give TARGET CTAs)
    MINB: int = 1           # __launch_bounds__ min blocks per SM
    TARGET: int = 132       # CTAs wanted when SPLIT = 0
    ROLL: bool = False      # keep the loop over chunks of P blocks rolled
    S: int = 4              # x stages in shared memory (cp.async pipeline, one 64-k block each)


def token_tiles(M: int) -> int:
    return 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8


def resolve(c: WideCfg, M: int, N: int, K: int) -> tuple[WideCfg, int]:
    """Concrete (cfg, KBW) for a shape, or SpecqError: rows per CTA must divide N; every CTA gets an even number
    KBW of 64-k blocks (whole 128-k scale groups) that P divides."""
    rows = 16 * c.RT * c.WARPS
    KB = K // 64
    if M < 1 or M > MAX_M or N % rows or K % 128:
        raise SpecqError(f"w4wide: M={M} N={N} K={K} not supported by {c} (N % {rows}, K % 128, M <= {MAX_M})")
    split = c.SPLIT
    if split == 0:
        split = 1
        while (N // rows) * split < c.TARGET and KB % (4 * split) == 0:
            split *= 2
    if KB % (2 * split):
        raise SpecqError(f"w4wide: K={K} does not split {split} ways into whole 128-k groups")
    kbw = KB // split
    p = max(2, min(c.P, kbw))
    while kbw % p or p % 2:
        p -= 1
    return c._replace(SPLIT=split, P=p), kbw


def default_config(M: int, N: int, K: int) -> WideCfg:
    """8 warps x 2 row tiles (256 rows per CTA) where N allows, else fewer warps / row tiles."""
    for rt, warps in ((2, 8), (1, 8), (2, 4), (1, 4), (1, 2), (1, 1)):
        if N % (16 * rt * warps) == 0:
            return WideCfg(rt, warps)
    raise SpecqError(f"w4wide: N={N} is not a multiple of 16")


def supported(M: int, N: int, K: int) -> bool:
    try:
        resolve(default_config(M, N, K), M, N, K)
        return True
    except SpecqError:
        return False


def source(c: WideCfg, NT: int, KBW: int, fp16: bool) -> str:
    """The kernel's CUDA C for one resolved configuration."""
    magic, ht, et = ("0x64006400", "f16x2", "f16") if fp16 else ("0x43004300", "bf16x2", "bf16")
    head = (f"#define NT {NT}\n#define RT {c.RT}\n#define KBW {KBW}\n#define P {c.P}\n#define WARPS {c.WARPS}\n"
            f"#define SPLIT {c.SPLIT}\n#define S {c.S}\n#define MINB {c.MINB}\n#define ROLL {int(c.ROLL)}\n#define FP16 {int(fp16)}\n"
            f"#define MAGIC_STR \"{magic}\"\n#define HTYPE \"{ht}\"\n#define ETYPE \"{et}\"\n#define LDHINT \"\"\n")
    return head + w4mma.helpers(fp16) + _WIDE


_LOCKS: dict = {}


def kernel(c: WideCfg, NT: int, KBW: int, fp16: bool, device: int = 0):
    return w4mma.compiled(("w4wide", c, NT, KBW, fp16, device), lambda: source(c, NT, KBW, fp16), "w4wide")


def locks_for(w: w4mma.MMAWeight) -> torch.Tensor:
    """One zeroed int32 counter per 16-row tile of the weight (enough for any rows per CTA), kept per weight."""
    key = w.words.data_ptr()
    hit = _LOCKS.get(key)
    if hit is None or hit[0] is not w.words:
        hit = _LOCKS[key] = (w.words, torch.zeros(w.N // 16, dtype=torch.int32, device=w.words.device))
    return hit[1]


def w4wide_linear(x: torch.Tensor, w: w4mma.MMAWeight, cfg: WideCfg | None = None) -> torch.Tensor:
    """x [M, K] (M <= 64, 16-bit, CUDA) @ W^T -> [M, N]."""
    M, K = x.shape
    if K != w.K:
        raise SpecqError(f"w4wide: x {tuple(x.shape)} against weight K={w.K}")
    c, kbw = resolve(cfg or default_config(M, w.N, K), M, w.N, K)
    if x.stride(-1) != 1 or (x.stride(0) * 2) % 16 or x.data_ptr() % 16:
        x = x.contiguous().clone()
    y = torch.empty(M, w.N, dtype=x.dtype, device=x.device)
    ws = torch.empty(c.SPLIT, M, w.N, dtype=torch.float32, device=x.device) if c.SPLIT > 1 else y
    locks = locks_for(w)
    grid = (w.N // (16 * c.RT * c.WARPS), c.SPLIT, 1)
    with torch.cuda.device(x.device):
        kernel(c, token_tiles(M), kbw, w.fp16, x.device.index or 0)(
            grid=grid, block=(c.WARPS * 32, 1, 1), args=[w.words, w.sz, x, y, ws, locks, M, w.N, K, x.stride(0), y.stride(0)])
    return y
