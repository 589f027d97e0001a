"""W4A16 for few tokens (M <= 16) as a CUDA C kernel compiled at run time by NVRTC (torch.cuda._compile_kernel):
no build step, like Triton, but with the load schedule in our hands.

Why: the Triton kernel (w4a16.py) stages weights through shared memory with Triton's pipeliner and reaches ~54%
of DRAM bandwidth at one token (bench/results/h100/kernels_w4a16_dev.txt, run 9). Here every lane loads its own
mma fragments straight into registers with 16-byte loads, P blocks ahead (a register ring), so each warp keeps
P * 512 B of weights in flight with no shared memory and no barrier in the loop.

Work split: one CTA per 16 output rows (one mma.m16n8k16 row tile), WARPS warps each over a K / WARPS slice
(KBW blocks of 64 k); the warps' fp32 partials are summed through shared memory at the end. Tokens are the
mma's n dimension: NT = 1 (M <= 8) or 2 (M <= 16) n8 tiles; lanes of absent tokens load nothing.

Word layout (repack_mma, once per weight): int32 [N/16, K/64, 32 lanes, 4 j]; lane (g, t) = (lane // 4, lane % 4)
of block (tile, b) holds in word j the A fragment of mma step j: nibble i (bits 4i, low half) and nibble i of
the high half (bits 16 + 4i) are the bf16 pair of register a_i, with row = 16 tile + g + 8 (i % 2) and
k = 64 b + 16 t + 4 j + 2 (i // 2) + e (e = 0 low, 1 high). Inside a 64-k block this permutes k consistently
for A and B (lane t always sees k 16t .. 16t+15), so a lane's x operand for the whole block is 32 contiguous
bytes (two 16-byte loads). Scales / zeros: int32 [N/16, K/128, 16]: scale bits << 16 | bits of -(MAGIC + z).
Dequantization: lop3 puts each nibble under a 16-bit float exponent (MAGIC | q == MAGIC + q exactly), one
packed fma adds -(MAGIC + z) (exact small integers); the group scale multiplies the fp32 mma result.
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch

from ..errors import SpecqError
from . import pdl as PDL
from .ref import unpack_int4

MAX_M = 64             # NT = 8 n8 tiles at most
# Programmatic dependent launch (specq.kernels.pdl; default on sm_90+, SPECQ_PDL=0 off): the kernel starts with
# griddepcontrol.wait, then launch_dependents, before anything else, and is launched with the PDL attribute inside
# CUDA-graph capture, so the next CTAs' launch overlaps the end of the previous kernel. Outside capture it is
# launched as usual (the wait is then a no-op). Session 8's variant with a weight prefetch before the wait and
# coherent x loads was slower (kernels_w4a16_dev.txt run 13b); this one: one 8B layer 49.8 against 52.6 us.
OLD_M1 = os.environ.get("SPECQ_W4_OLD_M1", "0") == "1"   # A/B switch: session 10's one-token configs
MAX_SMALL_M = 16       # w4a16_linear uses this kernel up to here (beyond, the Triton kernel is faster on the H100)
_HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define MAGIC MAGIC_BITS
#define ONE ONE_BITS

__device__ __forceinline__ u32 deq(u32 w, u32 nz2) {
    u32 r, o;
    asm("lop3.b32 %0, %1, 0x000F000F, " MAGIC_STR ", 0xEA;" : "=r"(r) : "r"(w));
    asm("fma.rn." HTYPE " %0, %1, %2, %3;" : "=r"(o) : "r"(r), "r"((u32)ONE), "r"(nz2));
    return o;
}
__device__ __forceinline__ u32 deqs(u32 w, u32 nz2, u32 s2) {   // (q - z) * s, one rounding
    u32 o;
    asm("fma.rn." HTYPE " %0, %1, %2, %3;" : "=r"(o) : "r"(deq(w, nz2)), "r"(s2), "r"(0x80008000u));
    return o;
}
__device__ __forceinline__ uint4 ldw(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate" LDHINT ".v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ uint4 ldx(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 ldx2(const uint2* p) {
    uint2 v;
    asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 lds(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ float scale_of(u32 w) {
#if FP16
    float f; u16 h = (u16)(w >> 16);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return __uint_as_float(w & 0xFFFF0000u);
#endif
}
__device__ __forceinline__ float f32(u16 h) {
#if FP16
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return __uint_as_float((u32)h << 16);
#endif
}
__device__ __forceinline__ float qsum(const float* ws, int n, int N, int row) {   // sum_c ws[c, row], chunk order
    float cs = 0.f;                                 // coherent loads (written by another kernel), 8 in flight at once
    for (int c0 = 0; c0 < n; c0 += 8) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            v[u] = 0.f;
            if (c0 + u < n) asm volatile("ld.global.f32 %0, [%1];" : "=f"(v[u]) : "l"(ws + (size_t)(c0 + u) * N + row));
        }
#pragma unroll
        for (int u = 0; u < 8; u++) cs += v[u];
    }
    return cs;
}
#if QI
__device__ __forceinline__ void qload(float* v, const float* ws, int N, int row) {   // QN partials of a row, in flight
#pragma unroll
    for (int u = 0; u < QN; u++)
        asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(v[u]) : "l"(ws + (size_t)u * N + row) : "memory");
}
__device__ __forceinline__ float qfinish(float* v, float* ws, int N, int row) {   // qload's values: the ones still
    int spin = 0;                                   // QG_EMPTY (qdec1's CTAs not done then) polled again, all in flight;
    bool ready;                                     // sum in chunk order, reset for the next launch
    do {
        ready = true;
#pragma unroll
        for (int u = 0; u < QN; u++) ready &= __float_as_uint(v[u]) != QG_EMPTY;
        if (ready) break;
#pragma unroll
        for (int u = 0; u < QN; u++)
            if (__float_as_uint(v[u]) == QG_EMPTY)
                asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(v[u]) : "l"(ws + (size_t)u * N + row) : "memory");
    } while (++spin < (1 << 20));
    float cs = 0.f;
#pragma unroll
    for (int u = 0; u < QN; u++) {
        cs += v[u];
        ws[(size_t)u * N + row] = __uint_as_float(QG_EMPTY);
    }
    return cs;
}
__device__ __forceinline__ float qsum_now(float* ws, int N, int row) {   // QI, a row read only now: all its
    float v[QN];                                                          // QN partials in flight, then qfinish
    qload(v, ws, N, row);
    return qfinish(v, ws, N, row);
}
#endif
__device__ __forceinline__ u16 to16(float f);
__device__ __forceinline__ u32 norm2(u32 v, u32 w, float r) {   // RMSNorm of a 16-bit pair: w * (x * r), as torch
    const u16 a = to16(f32((u16)(v & 0xFFFF)) * r), b = to16(f32((u16)(v >> 16)) * r);
    return (u32)to16(f32((u16)(w & 0xFFFF)) * f32(a)) | (u32)to16(f32((u16)(w >> 16)) * f32(b)) << 16;
}
__device__ __forceinline__ u16 to16(float f) {
    u16 h;
#if FP16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." ETYPE "." ETYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

"""
_SMALL = r"""
// qw: [N/16, K/64, 32, 4] words; sz: [N/16, K/128, 16]; x: [M, K] (row stride sxm); y: [M, N] (row stride sym)
// PRO (M = 1): x <- RMSNorm(x) with weight nw [K], each warp writing its K slice to shared memory first
// (xs [K/8] uint4, dynamic). RES: y <- res + y (res [M, N], row stride srm), rounded as torch rounds y, then
// the sum. (A SiLU-and-multiply prologue for down_proj was tried and dropped: every CTA recomputes the whole K of
// SiLU, which cost 8.4 us per layer more than a separate kernel, bench/results/h100/kernels_w4a16_dev.txt.)
extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)
w4mma(const uint4* __restrict__ qw, const u32* __restrict__ sz, const u16* __restrict__ x, u16* __restrict__ y,
      int M, int K, int sxm, int sym, const u16* __restrict__ nw, const u16* __restrict__ res, int srm,
      float* qws, const float* __restrict__ qsc, int qnc, float* qg, const float* __restrict__ qthr,
      const u32* qcodes)
{
    __shared__ float4 red[WARPS][NT][32];
#if PRO
    extern __shared__ uint4 xs[];
#endif
#if QI      // compensation inside this grid: its first QC CTAs are qdec1's (specq.compensate.mma: they wait for x's
            // producer, select, fetch, and store the chunk partials into qws, which holds QG_EMPTY between launches)
    if (blockIdx.x < QC) {
#if QDIAG != 3          // bench/dev diagnostics: 3 = the compensation CTAs exit at once, the epilogue adds nothing
        qdec1_cta(x, qthr, qcodes, qws, (int)(gridDim.x - QC) * 2, qnc, blockIdx.x / QNY, blockIdx.x % QNY);
#endif
        return;
    }
#endif
#if PDL && (!QD || QI)  // launched with programmatic dependent launch: the previous kernel done and flushed before any read
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x - QC;                            // row tile (QC: compensation CTAs first)
    const int KB = K >> 6;
    const int kb0 = warp * KBW;                                   // first 64-k block of this warp
    const uint4* wp = qw + ((size_t)tile * KB + kb0) * 32 + lane;
    const u32* sp = sz + ((size_t)tile * (KB >> 1) + (kb0 >> 1)) * 16 + g;
    const uint4* xp[NT];
    bool xv[NT];
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int m = g + 8 * n;
        xv[n] = m < M;
#if PRO
        xp[n] = xs + (size_t)(xv[n] ? m : 0) * (K >> 3) + kb0 * 8 + 2 * t;
#else
        xp[n] = (const uint4*)(x + (size_t)(xv[n] ? m : 0) * sxm + (size_t)kb0 * 64 + 16 * t);
#endif
    }
#if QI      // the epilogue's compensation rows (NT = 1: thread t < 128 owns row (t >> 4) + 8 ((t & 3) >> 1) of its tile when
            // t & 13 == 0): their partials are loaded right after the main loop, in flight during the reduction across
            // warps. (Loaded at the start of the last main-loop round instead, up to 4 chunks: slower, +15.7 against
            // +10.7% at k = 0.005 in one process; registers spilled. bench/results/h100/qdec_fused_dev.txt, session 15)
    const bool qown = threadIdx.x < 128 && (threadIdx.x & 13) == 0;
    const int qrow = tile * 16 + (threadIdx.x >> 4) + 8 * ((threadIdx.x & 3) >> 1);
    float qv[QN];
#endif
    float acc[NT][4], tmp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[n][r] = 0.f;
    uint4 wb[P];                      // weight ring: blocks b .. b+P-1 in flight
    u32 sb[P / 2][2];                 // scale/zero words of their groups (rows g, g + 8)
    uint4 xb[XR > 0 ? XR : 1][NT][2];   // x of blocks b .. b+XR-1 (XR = 0: 8-byte loads right before each mma)
#pragma unroll
    for (int i = 0; i < P; i++) {
        if (i < KBW) {
            wb[i] = ldw(wp + i * 32);
            if (i % 2 == 0) { sb[i / 2][0] = lds(sp + (i / 2) * 16); sb[i / 2][1] = lds(sp + (i / 2) * 16 + 8); }
        }
    }
#if PRO    // one token: the weight ring above is in flight while each warp normalizes x over its own K slice
    {
        constexpr int PER = (KBW * 8 + 31) / 32;                 // uint4 of x per lane
        __shared__ float part[WARPS];
        uint4 v[PER];
#pragma unroll
        for (int i = 0; i < PER; i++)                             // all loads first
            if (lane + 32 * i < KBW * 8) v[i] = __ldg((const uint4*)x + kb0 * 8 + lane + 32 * i);
        float ss = 0.f;                                           // sum of squares, fp32: warp slice, then CTA
#pragma unroll
        for (int i = 0; i < PER; i++) {
            if (lane + 32 * i < KBW * 8) {
                const u32 vs[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float a = f32((u16)(vs[j] & 0xFFFF)), b = f32((u16)(vs[j] >> 16));
                    ss += a * a + b * b;
                }
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
        if (lane == 0) part[warp] = ss;
        __syncthreads();
        float tot = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) tot += part[w];
        const float r = rsqrtf(tot / (float)K + EPS);
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int c = kb0 * 8 + lane + 32 * i;
            if (lane + 32 * i < KBW * 8) {
                const uint4 w = __ldg((const uint4*)nw + c);
                xs[c] = make_uint4(norm2(v[i].x, w.x, r), norm2(v[i].y, w.y, r), norm2(v[i].z, w.z, r),
                                   norm2(v[i].w, w.w, r));
            }
        }
        __syncwarp();                                             // a warp reads back only its own slice
    }
#define LDX(p) (*(p))
#else
#define LDX(p) ldx(p)
#endif
#pragma unroll
    for (int i = 0; i < XR; i++)
#pragma unroll
        for (int n = 0; n < NT; n++) {
            const uint4 z = make_uint4(0, 0, 0, 0);
            xb[i][n][0] = (i < KBW && xv[n]) ? LDX(xp[n] + i * 8) : z;
            xb[i][n][1] = (i < KBW && xv[n]) ? LDX(xp[n] + i * 8 + 1) : z;
        }
    u32 s0 = 0, s1 = 0;
#if ROLL
#pragma unroll 1
#else
#pragma unroll
#endif
    for (int c0 = 0; c0 < KBW; c0 += P) {
#pragma unroll
    for (int i = 0; i < P; i++) {
        const int b = c0 + i;           // ring slots by i: c0 is a multiple of P (P even, P % XR == 0)
        if (b >= KBW) break;
        const uint4 w = wb[i];
        if (b + P < KBW) wb[i] = ldw(wp + (b + P) * 32);
        if (i % 2 == 0) {
            s0 = sb[i / 2][0];
            s1 = sb[i / 2][1];
            if (b + P < KBW) {
                sb[i / 2][0] = lds(sp + ((b + P) / 2) * 16);
                sb[i / 2][1] = lds(sp + ((b + P) / 2) * 16 + 8);
            }
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int r = 0; r < 4; r++) tmp[n][r] = 0.f;
            (void)tmp;
        }
        uint4 xa[NT][2];
#pragma unroll
        for (int n = 0; n < NT && XR > 0; n++) {
            xa[n][0] = xb[i % XR][n][0];
            xa[n][1] = xb[i % XR][n][1];
            if (b + XR < KBW && xv[n]) {
                xb[i % XR][n][0] = LDX(xp[n] + (b + XR) * 8);
                xb[i % XR][n][1] = LDX(xp[n] + (b + XR) * 8 + 1);
            }
        }
        const u32 nzg = (s0 & 0xFFFFu) * 0x10001u, nzh = (s1 & 0xFFFFu) * 0x10001u;
#if PRE
        const u32 sg = (s0 >> 16) * 0x10001u, sh = (s1 >> 16) * 0x10001u;
#endif
        const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
#if PRE
            const u32 a0 = deqs(ws[j], nzg, sg), a1 = deqs(ws[j] >> 4, nzh, sh);
            const u32 a2 = deqs(ws[j] >> 8, nzg, sg), a3 = deqs(ws[j] >> 12, nzh, sh);
#else
            const u32 a0 = deq(ws[j], nzg), a1 = deq(ws[j] >> 4, nzh);
            const u32 a2 = deq(ws[j] >> 8, nzg), a3 = deq(ws[j] >> 12, nzh);
#endif
#pragma unroll
            for (int n = 0; n < NT; n++) {
#if XR > 0
                const uint4 xq4 = xa[n][j / 2];
                const uint2 xq = (j % 2) ? make_uint2(xq4.z, xq4.w) : make_uint2(xq4.x, xq4.y);
#else
#if PRO
                const uint4 xq4 = xv[n] ? xp[n][b * 8 + j / 2] : make_uint4(0, 0, 0, 0);
                const uint2 xq = (j % 2) ? make_uint2(xq4.z, xq4.w) : make_uint2(xq4.x, xq4.y);
#else
                const uint2 xq = xv[n] ? ldx2((const uint2*)(xp[n] + b * 8) + j) : make_uint2(0, 0);
#endif
#endif
#if PRE
                mma(acc[n], a0, a1, a2, a3, xq.x, xq.y);
#else
                mma(tmp[n], a0, a1, a2, a3, xq.x, xq.y);
#endif
            }
        }
        if (!PRE && i % 2 == 1) {
            const float fg = scale_of(s0), fh = scale_of(s1);
#pragma unroll
            for (int n = 0; n < NT; n++) {
                acc[n][0] += tmp[n][0] * fg; acc[n][1] += tmp[n][1] * fg;
                acc[n][2] += tmp[n][2] * fh; acc[n][3] += tmp[n][3] * fh;
            }
        }
    }
    }
#if QI
    if (qown) qload(qv, qws, NTL * 16, qrow);
#endif
#pragma unroll
    for (int n = 0; n < NT; n++) red[warp][n][lane] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
    __syncthreads();
EPILOGUE
}
"""


_EPILOGUE = r"""#if QD == 2  // many waves (M = 1): the first qE row tiles never wait; each of the last ceil(T / (QR + 1)) tiles waits,
            // finishes itself and QR early tiles (stored in qg as fp32 sums, see below)
    const int qE = NTL - (NTL + QR) / (QR + 1), qe = (tile - qE) * QR;   // qe: its first early tile
    const bool qearly = tile < qE;
#if PDL && !QI
    if (!qearly) asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#elif PDL && QD == 1 && !QI   // the compensation kernel (specq.compensate.mma) launched just before: its partials are ready
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    for (int i = threadIdx.x; i < NT * 128; i += WARPS * 32) {
        const int n = i >> 7, l = (i >> 2) & 31, r = i & 3;
        float s = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; v++) s += ((const float*)&red[v][n][l])[r];
        const int row = tile * 16 + (l >> 2) + 8 * (r >> 1);
        const int tok = 8 * n + 2 * (l & 3) + (r & 1);
#if QD == 2
        if (qearly) {                                   // a plain store: the value itself is the signal (qg holds
            if (tok == 0) qg[row] = s;                  // QG_EMPTY between launches), no fence, no counter
            continue;
        }
#endif
#if QD >= 1 // one token: + scale[row] * sum over chunks of x[S] (q - 8) (the chunk partials, in chunk order)
        if (tok == 0) s += QSUM(row) * qsc[row];
#endif
#if RES
        if (tok < M) y[(size_t)tok * sym + row] = to16(f32(to16(s)) + f32(res[(size_t)tok * srm + row]));
#else
        if (tok < M) y[(size_t)tok * sym + row] = to16(s);
#endif
    }
#if QD == 2 // the rows of early tiles qe .. qe + QR - 1, from the CTA's last threads down (beside the own rows above):
            // their sums from qg (polled: the early CTAs have lower indices, so they were dispatched first, and they
            // wait for nothing), + compensation; qg reset for the next launch. The spin is bounded so that a broken
            // assumption cannot hang the GPU.
    for (int j = WARPS * 32 - 1 - threadIdx.x; !qearly && j < 16 * QR; j += WARPS * 32) {
        if (qe + (j >> 4) < qE) {
            const int row = (qe + (j >> 4)) * 16 + (j & 15);
            const float cs = QSUM2(row);                               // issued before the poll
            float s;
            int spin = 0;
            do {
                asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(s) : "l"(qg + row) : "memory");
            } while (__float_as_uint(s) == QG_EMPTY && ++spin < (1 << 20));
            s += cs * qsc[row];
            qg[row] = __uint_as_float(QG_EMPTY);
#if RES
            y[row] = to16(f32(to16(s)) + f32(res[row]));
#else
            y[row] = to16(s);
#endif
        }
    }
#endif
"""     # replaced by bench/dev/glu_ab.py's experiment
_SMALL = _SMALL.replace("EPILOGUE", _EPILOGUE)


class MMAWeight(NamedTuple):
    words: torch.Tensor     # int32 [N/16, K/64, 32, 4] (repack_mma)
    sz: torch.Tensor        # int32 [N/16, K/128, 16]: scale bits << 16 | bits of -(MAGIC + z)
    N: int
    K: int
    fp16: bool


def helpers(fp16: bool) -> str:
    """The device functions shared by the few-token kernel and the experimental wide kernel (bench/dev/w4wide_exp.py)."""
    magic, one = ("0x64006400", "0x3C003C00") if fp16 else ("0x43004300", "0x3F803F80")
    return _HELPERS.replace("MAGIC_BITS", magic + "u").replace("ONE_BITS", one + "u")


def source(NT: int, KBW: int, P: int, WARPS: int, fp16: bool, minb: int = 1, l2hint: bool = False, XR: int = 2,
           pre: bool = False, roll: bool = False, pro: bool = False, res: bool = False, eps: float = 0.0,
           pdl: bool = False, qd: int = 0, qr: int = 1, qi: tuple | None = None) -> str:
    """The kernel's CUDA C for one configuration (compile-time constants substituted). pro: RMSNorm prologue
    (epsilon eps) of one token; res: add a residual to the output; qd: compensation epilogue (1 one wave, 2 many
    waves with qr early tiles per waiting one); qi: (qc, qny, defines, device source): the compensation's qc CTAs
    first in this grid (qny column blocks per chunk group; specq.compensate.mma.ingrid)."""
    magic, one, ht, et = ("0x64006400", "0x3C003C00", "f16x2", "f16") if fp16 else \
        ("0x43004300", "0x3F803F80", "bf16x2", "bf16")
    head = (f"#define NT {NT}\n#define KBW {KBW}\n#define P {P}\n#define WARPS {WARPS}\n#define MINB {minb}\n"
            f"#define PDL {int(pdl)}\n#define QD {int(qd)}\n#define QG_EMPTY {QG_EMPTY:#x}u\n#define QR {int(qr)}\n#define PRO {int(pro)}\n#define RES {int(res)}\n#define EPS {float(eps)!r}f\n#define ROLL {int(roll)}\n#define XR {XR}\n#define PRE {int(pre)}\n#define FP16 {int(fp16)}\n#define MAGIC_STR \"{magic}\"\n#define HTYPE \"{ht}\"\n"
            f"#define ETYPE \"{et}\"\n#define LDHINT \"{'.L2::256B' if l2hint else ''}\"\n")
    if qi is None:
        return head + ("#define QI 0\n#define QC 0\n#define NTL gridDim.x\n#define QSUM(row) qsum(qws, qnc, NTL * 16, row)\n"
                       "#define QSUM2 QSUM\n") + helpers(fp16) + _SMALL
    qc, qny, qn, qdefs, qsrc = qi
    return (head + f"#define QI 1\n#define QC {int(qc)}\n#define QNY {int(qny)}\n#define QN {int(qn)}\n"
            "#define NTL (gridDim.x - QC)\n#define QSUM(row) (QDIAG >= 3 ? 0.f : qfinish(qv, qws, NTL * 16, row))\n"
            "#define QSUM2(row) (QDIAG >= 3 ? 0.f : qsum_now(qws, NTL * 16, row))\n" + qdefs + helpers(fp16) + qsrc + _SMALL)


def repack_mma(qweight: torch.Tensor, natural_k: bool = False) -> torch.Tensor:
    """Canonical qweight [N, K//8] (N % 16 == 0, K % 64 == 0) -> words [N/16, K/64, 32, 4] (module docstring).
    natural_k: the wgmma kernel's layout (w4wg.py): register a_i of step j holds k = 64 b + 16 j + 8 (i // 2) + 2 t + e
    instead of 64 b + 16 t + 4 j + 2 (i // 2) + e."""
    N, W = qweight.shape
    K = 8 * W
    q = unpack_int4(qweight).to(torch.int64)                                 # [N, K]
    # row = 16 tile + 8 h + g;  k = 64 b + 16 t + 4 j + 2 c + e (natural_k: 64 b + 16 j + 8 c + 2 t + e);
    # register i = 2 c + h
    if natural_k:
        q = q.view(N // 16, 2, 8, K // 64, 4, 2, 4, 2)                       # [tile, h, g, b, j, c, t, e]
        q = q.permute(0, 3, 2, 6, 4, 7, 5, 1)                                # [tile, b, g, t, j, e, c, h]
    else:
        q = q.view(N // 16, 2, 8, K // 64, 4, 4, 2, 2)                       # [tile, h, g, b, t, j, c, e]
        q = q.permute(0, 3, 2, 4, 5, 7, 6, 1)                                # [tile, b, g, t, j, e, c, h]
    shift = (16 * torch.arange(2).view(2, 1, 1) + 4 * (2 * torch.arange(2).view(1, 2, 1)
                                                       + torch.arange(2).view(1, 1, 2))).to(q.device)
    w = (q << shift).sum((-3, -2, -1))                                        # [tile, b, g, t, j]
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return w.reshape(N // 16, K // 64, 32, 4).contiguous()


def pack_sz(scales: torch.Tensor, zeros: torch.Tensor, K: int, fp16: bool) -> torch.Tensor:
    """scales / zeros [N, K // G] (G a multiple of 128) -> int32 [N/16, K/128, 16]."""
    N, ng = scales.shape
    rep = (K // 128) // ng
    dt = torch.float16 if fp16 else torch.bfloat16
    s = scales.to(dt).repeat_interleave(rep, dim=1)                           # [N, K/128]
    nz = (-(zeros.float() + (1024.0 if fp16 else 128.0))).to(dt).repeat_interleave(rep, dim=1)
    word = (s.view(torch.int16).to(torch.int32) << 16) | (nz.view(torch.int16).to(torch.int32) & 0xFFFF)
    return word.view(N // 16, 16, K // 128).transpose(1, 2).contiguous()


def available() -> bool:
    """NVRTC through torch (CUDA builds of torch >= 2.8), not disabled by SPECQ_NO_MMA=1."""
    return (hasattr(torch.cuda, "_compile_kernel") and torch.version.cuda is not None
            and os.environ.get("SPECQ_NO_MMA", "0") != "1")


def supported(N: int, K: int, group_size: int) -> bool:
    return N % 16 == 0 and K % 128 == 0 and (group_size in (-1, 0, None) or group_size % 128 == 0)


def prepare_mma(qweight, scales, zeros, group_size=None, dtype=torch.bfloat16, natural_k: bool = False,
                row_multiple: int = 16, name: str = "w4mma") -> MMAWeight:
    """Words (repack_mma; natural_k: the wgmma kernel's layout) and scale/zero words; N % row_multiple == 0."""
    N, W = qweight.shape
    K = 8 * W
    G = K if group_size in (None, -1, 0) else int(group_size)
    zf = zeros.float()
    if (not supported(N, K, G) or N % row_multiple or K % G
            or not bool(((zf == zf.round()) & (zf.abs() <= 64)).all())):
        raise SpecqError(f"{name}: unsupported weight N={N} K={K} group {group_size} (or non-integer zeros)")
    fp16 = dtype == torch.float16
    return MMAWeight(repack_mma(qweight, natural_k), pack_sz(scales, zeros, K, fp16), N, K, fp16)


def emulate(x: torch.Tensor, w: MMAWeight) -> torch.Tensor:
    """What the kernel computes, in fp32 torch, reading the words the way the lanes do (for CPU tests): decode
    every lane's registers back to (row, k) and apply the per-group scale to the fp32 sums."""
    T, B = w.N // 16, w.K // 64
    words = w.words.to(torch.int64) & 0xFFFFFFFF                             # [T, B, 32, 4]
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    q = torch.empty(w.N, w.K, dtype=torch.float32)
    magic = 1024.0 if w.fp16 else 128.0
    nz = ((w.sz.to(torch.int64) & 0xFFFF).to(torch.int16).view(torch.float16 if w.fp16 else torch.bfloat16)
          .float())                                                          # [T, B/2, 16]
    for j in range(4):
        for i in range(4):
            for e in range(2):
                nib = ((words[:, :, :, j] >> (4 * i + 16 * e)) & 0xF).float() + magic    # [T, B, 32]
                row = (16 * torch.arange(T).view(T, 1, 1) + g.view(1, 1, 32) + 8 * (i % 2)).expand(T, B, 32)
                k = (64 * torch.arange(B).view(1, B, 1) + 16 * t.view(1, 1, 32) + 4 * j + 2 * (i // 2) + e).expand(T, B, 32)
                rg = g.view(1, 1, 32) + 8 * (i % 2)
                z = nz[torch.arange(T).view(T, 1, 1), (torch.arange(B) // 2).view(1, B, 1), rg.expand(T, B, 32)]
                q[row.reshape(-1), k.reshape(-1)] = (nib + z).reshape(-1)
    s = (w.sz.to(torch.int64) >> 16).to(torch.int16).view(torch.float16 if w.fp16 else torch.bfloat16).float()
    s = s.transpose(1, 2).reshape(w.N, w.K // 128)                           # [N, K/128]
    part = (x.float().view(-1, 1, w.K // 128, 128) * q.view(1, w.N, w.K // 128, 128)).sum(-1)   # [M, N, groups]
    return (part * s).sum(-1)


_KERNELS: dict = {}
_LOCK = threading.Lock()


class Cfg(NamedTuple):
    NT: int                 # n8 token tiles (M <= 8 NT)
    WARPS: int              # warps per CTA, each over K / WARPS
    P: int = 8              # 64-k weight blocks in flight per warp (register ring)
    XR: int = 2             # x blocks loaded ahead
    PRE: bool = False       # scale folded into the dequantized weights (no per-group fp32 partial)
    MINB: int = 3           # __launch_bounds__ min blocks per SM (caps registers)
    L2HINT: bool = False    # .L2::256B on the weight loads
    ROLL: bool = False      # keep the loop over chunks of P blocks rolled (fewer registers at long K)


def default_config(M: int, N: int, K: int, sms: int | None = None) -> Cfg:
    """Warps over K so that each takes an even number of 64-k blocks. H100, Llama-3-8B layer (bench/dev/mma_ab.py,
    kernels_w4a16_dev.txt run 11): M <= 8 fastest with 16 warps and 2 CTAs per SM (48.0 us at M = 1 against 51.5
    with 8 warps), M <= 16 with 8 warps, 2 CTAs (62.7 us); NT = 4 / 8 (M > 16) lose to the Triton kernel."""
    NT = 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8
    if NT == 1 and K % 2048 == 0:
        # one token under programmatic dependent launch (session 11, bench/dev/pdl_cfg.py: the fused 8B layer chain
        # in graph replays, 47.8 against 49.6 us per layer): 8 warps, 4 blocks in flight, 3 CTAs per SM for qkv_proj
        # and for many-wave shapes of K <= 4096 (gate_up_proj, lm_head); SPECQ_W4_OLD_M1=1 restores session 10's
        P1 = 8 if OLD_M1 or M > 1 else 4
        if sms and 2 * sms < N // 16 <= 3 * sms and K % 1024 == 0:
            # one wave of 8-warp CTAs, 3 per SM, instead of 1.45 waves of the 16-warp ones (Llama-3-8B qkv_proj:
            # 6.48 us against 7.28 at M = 1; every other 8B shape is fastest with 16 warps, bench/dev/mma_cfg.py)
            return Cfg(NT, 8, P1, 2, False, 3)
        if P1 == 4 and sms and N // 16 >= 8 * sms and K <= 4096:
            return Cfg(NT, 8, 4, 2, False, 3)
        return Cfg(NT, 16, 8, 2, False, 2)
    if NT == 2 and K % 1024 == 0:
        return Cfg(NT, 8, 8, 2, False, 2)
    for warps in (8, 4, 2, 1):
        if K % (128 * warps) == 0:
            if NT <= 2:
                return Cfg(NT, warps, 8, 2, False, 3)
            return Cfg(NT, warps, 2, 0, True, 1, ROLL=True)
    raise SpecqError(f"w4mma: K={K} is not a multiple of 128")


def compiled(key, make_source, name: str, arch: str | None = None):
    """The NVRTC-compiled kernel `name` for a cache key (its CUDA C from make_source(), compiled once per key, loaded
    into the current device's context: call under that device). arch: e.g. "90a" (wgmma), default the device's."""
    k = _KERNELS.get(key)
    if k is None:
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                if not hasattr(torch.cuda, "_compile_kernel"):
                    raise SpecqError(f"{name} needs torch.cuda._compile_kernel (NVRTC), not in torch {torch.__version__}")
                k = _KERNELS[key] = (torch.cuda._compile_kernel(make_source(), name) if arch is None else
                                         torch.cuda._compile_kernel(make_source(), name, compute_capability=arch))
    return k


def kernel(c: Cfg, KBW: int, fp16: bool, device: int = 0, pro: bool = False, res: bool = False, eps: float = 0.0,
           pdl: bool = False, qd: int = 0, qr: int = 1, qi: tuple | None = None):
    """The compiled kernel for one configuration, loaded into `device`'s context (call under that device)."""
    return compiled(("w4mma", c, KBW, fp16, device, pro, res, eps, pdl, qd, qr, qi[:4] if qi else None),
                    lambda: source(c.NT, KBW, c.P, c.WARPS, fp16, c.MINB, c.L2HINT, c.XR, c.PRE, c.ROLL, pro, res, eps,
                                   pdl, qd, qr, qi), "w4mma")


QG_EMPTY = 0xFFFFFFFF   # compensation, many-wave grids: a NaN no float sum produces, "no sum yet" in qg
_QG: dict = {}


def _qg(w: "MMAWeight", device) -> torch.Tensor:
    """Per weight: float32 [N] holding QG_EMPTY between launches (the early tiles' sums pass through it within a
    launch; the tile that reads a sum resets it). Allocated on the first (eager) call, before any graph capture."""
    key = (w.words.data_ptr(), str(device))
    q = _QG.get(key)
    if q is None:
        if torch.cuda.is_current_stream_capturing():
            raise SpecqError("w4mma: run a compensated Linear once eagerly before capturing it")
        q = _QG[key] = torch.full((w.N,), -1, dtype=torch.int32, device=device).view(torch.float32)
    return q


FUSE_SMEM = 32 * 1024  # fused norm: the normalized x in shared memory, K * 2 bytes at most (no opt-in beyond 48 KB)


def fusable(M: int, K: int) -> bool:
    """The fused RMSNorm prologue takes one token (decoding) of width K. More tokens: in the session-9 e2e run the
    verification curve had T(2) = 2.51 and T(4) = 2.98 ms with the norm fused (it spilled registers there) against
    T(8) = 2.45 unfused (e2e_8b_qhead_s9.json latency; kernels_w4a16_dev.txt run 14)."""
    return M == 1 and K * 2 <= FUSE_SMEM


_SMS: dict = {}


def _sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    i = device.index or 0
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t with unit last stride and 16-byte aligned rows (a copy only when needed)."""
    if t.stride(-1) != 1 or (t.dim() > 1 and (t.stride(0) * 2) % 16) or t.data_ptr() % 16:
        t = t.contiguous().clone()
    return t


def w4mma_linear(x: torch.Tensor, w: MMAWeight, cfg: Cfg | None = None, norm_w: torch.Tensor | None = None,
                 eps: float = 0.0, res: torch.Tensor | None = None, comp: tuple | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_M, 16-bit, CUDA) @ W^T -> [M, N]. Fused, in one kernel: norm_w [K] (M tokens fitting
    fusable()): x <- RMSNorm(x) (epsilon eps) first; res [M, N]: returns res + x @ W^T. Each step rounds to x's
    dtype as the separate torch ops do (bit-equal to them on the H100, bench/check_kernels.py). comp (one token):
    (ws float32 [n, N], scale float32 [N], n) from specq.compensate.mma, launched just before on the same stream:
    y = x @ W^T + scale * sum_c ws[c] before the rounding; or (ws, scale, n, (qc, qny, n, defines, source, thr, codes))
    with the compensation's qc CTAs first in this grid (specq.compensate.mma.ingrid: ws holds QG_EMPTY between
    launches, each partial polled by the CTA that adds it, which resets it). Under PDL the epilogue waits for that kernel: every CTA
    when the grid is one wave; else only the last ~1 / (QR + 1) of the row tiles (about the last, partial wave),
    each finishing itself and QR early tiles, whose CTAs store fp32 sums and exit without waiting (they would hold
    SMs that later waves need; session 11's per-block counters with a fence in every CTA cost +3.6 us on
    gate_up_proj, bench/results/h100/qdec_fused_dev.txt session 14)."""
    M, K = x.shape
    pro = norm_w is not None
    if K != w.K or M > MAX_M or M < 1:
        raise SpecqError(f"w4mma: x {tuple(x.shape)} against weight K={w.K} (M <= {MAX_M})")
    if pro and not fusable(M, K):
        raise SpecqError(f"w4mma: a fused prologue takes one token of K * 2 <= {FUSE_SMEM} bytes (M={M}, K={K})")
    if comp is not None and (M != 1 or comp[0].dtype != torch.float32 or comp[0].shape[-1] != w.N or pro):
        raise SpecqError(f"w4mma: compensation partials take one token and float32 [n, {w.N}], without a fused "
                         "norm (they were selected from x as given)")
    if comp is not None and len(comp) > 3 and (len(comp[3]) != 7 or comp[3][2] != comp[2] or comp[0].shape[0] < comp[2]):
        raise SpecqError(f"w4mma: in-grid compensation (qc, qny, n, defines, source, thr, codes) must be for the "
                         f"partials' {comp[2]} chunks")
    if res is not None and (tuple(res.shape) != (M, w.N) or res.dtype != x.dtype or res.stride(-1) != 1):
        raise SpecqError(f"w4mma: residual {tuple(res.shape)} {res.dtype} does not match the output ({M}, {w.N})")
    c = cfg or default_config(M, w.N, K, _sms(x.device))
    KBW = K // 64 // c.WARPS
    c = c._replace(P=max(2, min(c.P, KBW)), XR=min(c.XR, 2))
    x = _aligned(x)
    if norm_w is not None:
        norm_w = _aligned(norm_w.to(x.dtype))
    y = torch.empty(M, w.N, dtype=x.dtype, device=x.device)
    shm = K * 2 if pro else 0
    with torch.cuda.device(x.device):            # module and stream of x's GPU, whatever the current device is
        pdl = PDL.enabled(x.device)
        slots = c.MINB * _sms(x.device)
        qd = 0 if comp is None else 2 if w.N // 16 > slots else 1
        qr = max(1, (w.N // 16 - 1) // slots)           # QD 2: the waiting tiles ~ the last, partial wave
        qi = comp[3] if comp is not None and len(comp) > 3 else None   # (qc, qny, qn, defines, source, thr, codes)
        k = kernel(c, KBW, w.fp16, x.device.index or 0, pro, res is not None, float(eps) if pro else 0.0, pdl, qd,
                   qr if qd == 2 else 1, qi[:5] if qi else None)
        args = [w.words, w.sz, x, y, M, K, x.stride(0), y.stride(0), norm_w if norm_w is not None else x,
                res if res is not None else y, res.stride(0) if res is not None else 0,
                comp[0] if comp is not None else y, comp[1] if comp is not None else y,
                int(comp[2]) if comp is not None else 0,
                _qg(w, x.device) if qd == 2 else y, qi[5] if qi else y, qi[6] if qi else y]
        grid = (w.N // 16 + (qi[0] if qi else 0), 1, 1)
        cap = pdl and torch.cuda.is_current_stream_capturing()
        if cap or qi:                                   # qi: a mapped host pointer, which only PDL.launch passes
            PDL.launch(k, grid, (c.WARPS * 32, 1, 1), args, shared_mem=shm, pdl=cap)
        else:
            k(grid=grid, block=(c.WARPS * 32, 1, 1), args=args, shared_mem=shm)
    return y
