"""One-token compensation on specq's decode kernels (w4mma, W3A16), CUDA: no side stream, no add kernel.

    w4mma [qdec1 CTAs | GEMV CTAs]   in-grid (linear_ingrid, the default where ingrid_shape fits): the first CTAs
                                     of w4mma's grid run qdec1's code; the GEMV CTAs poll their rows' partials
    qdec1  ->  w4mma                 apart (linear; SPECQ_QDEC_INGRID=0): PDL launch, w4mma starts while qdec1
                                     runs; its epilogue waits for qdec1's grid
    W3A16 GEMV  ->  qdec1  ->  reduction   (linear_w3; qdec1 AFTER: PDL launch in the GEMV's last wave, waits for the
                                     GEMV at its end; the split-K reduction adds the partials)
    y = x @ Q(W)^T + scale * sum_c x[S_c] (q(R[S_c]) - 8)         S_c: the bucket top-KC of chunk c of x

qdec1 has one CTA per (CH chunks, block of columns) (launch_shape: CH = 1 unless its CTAs must fit beside a one-wave
w4mma grid); each CTA
  1. reads its chunks' thresholds, waits for the previous kernel (griddepcontrol.wait) and lets w4mma launch
     (launch_dependents);
  2. selects each chunk's KC channels from x exactly as specq.compensate.select.approx_topk does (bucket = number
     of thresholds above |x|; every channel of the buckets above the boundary bucket, then the boundary bucket's
     first channels in channel order) with a shared-memory histogram and one block scan;
  3. reads those rows of the 4-bit residual codes for its columns straight from pinned host memory (the mapped
     pointer: zero-copy over PCIe, one 4-byte word of 8 columns per thread and row, all loads in flight at once);
  4. writes the fp32 partials ws[c, columns] = sum_s x[s] (q - 8) (unscaled).
w4mma's QD variant adds scale[row] * sum_c ws[c, row] to its fp32 sum before rounding. Under programmatic dependent
launch (CUDA-graph capture on sm_90+) w4mma's CTAs stream the weights while qdec1 selects and fetches; elsewhere the
two run one after the other on the stream (same result).
Why not the side stream (specq.compensate.kernel): w4mma's CTAs take every register of an SM, so side-stream kernels
waited for SMs (+105% at k = 0.5% against +91% for the Triton fused path, bench/results/h100/qdec_overhead.json).
"""
from __future__ import annotations

import os

import torch

from ..errors import SpecqError
from ..kernels import pdl as PDL
from ..kernels import w4mma
from ..kernels.w4mma import helpers

THREADS = 256          # qdec1 CTA
MAX_KC = 32            # channels per chunk the kernel takes (k_fraction up to ~3% of 1024-channel chunks)
WIDE_W, WPT_WIDE = 2048, 2   # rows of >= 16384 columns: 2 words per thread (half the CTAs beside the GEMV)

_SRC = r"""
#define FULL 0xFFFFFFFFu
__device__ __forceinline__ int block_excl_scan(int v, int* tot, int lane, int warp) {   // THREADS threads, in order
    int inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) { const int n = __shfl_up_sync(FULL, inc, o); if (lane >= o) inc += n; }
    if (lane == 31) tot[warp] = inc;
    __syncthreads();
    int off = 0;                                    // the warps before: independent loads, no loop-carried chain
#pragma unroll
    for (int w = 0; w < THREADS / 32; w++) off += w < warp ? tot[w] : 0;
    return off + inc - v;
}
__device__ __forceinline__ u16 ldx(const u16* p) {          // AFTER: through L2 (this CTA may start on an SM whose L1
#if AFTER                                                   // saw the previous token's x: no wait orders it here)
    u16 v;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
#else
    return *p;
#endif
}
__device__ __forceinline__ u32 ldh(const u32* p) {          // pinned host memory through its mapped pointer
    u32 v;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
// Bucket top-KC of chunk c (thresholds th [NB], descending) of one token x -> sidx[KC] channel ids in channel order,
// sxv[KC] their x. Every thread of the CTA calls it; it ends with a barrier.
__device__ __forceinline__ void select_chunk(const u16* __restrict__ x, const float* th, int c, int* hist, int* tot,
                                             int* bs, int* sidx, float* sxv, int t, int lane, int warp) {
    if (t < 64) hist[t] = t == NB ? KC : 0;         // the bottom bucket is not counted (most channels fall there:
                                                    // one shared address for ~C atomics); the rest always reaches KC
    float xv[CPT];
    int bk[CPT];
#pragma unroll
    for (int j = 0; j < CPT; j++)
        xv[j] = t * CPT + j < C ? f32(ldx(x + c * C + t * CPT + j)) : 0.f;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < CPT; j++) {                 // thread t holds channels t*CPT .. t*CPT+CPT-1 of the chunk
        const float a = fabsf(xv[j]);               // no branch: the CPT lifts interleave
        int b = 0;                                  // thresholds above a (descending: a prefix), binary lift;
#pragma unroll                                      // NaN: none above, the top bucket (as approx_topk)
        for (int s = 32; s >= 1; s >>= 1) if (b + s <= NB && a < th[b + s - 1]) b += s;
        bk[j] = t * CPT + j < C ? b : NB + 1;       // past the chunk: never taken
    }
#pragma unroll
    for (int j = 0; j < CPT; j++)                   // after all the lifts: they interleave, no atomic between them
        if (bk[j] < NB) atomicAdd(&hist[bk[j]], 1);
    __syncthreads();
    if (warp == 0) {                                // boundary bucket: the first whose running count reaches KC
        int cum = 0;                                // lanes hold buckets lane and 32 + lane (NB = 32: bucket 32)
        const int h0 = hist[lane], h1 = lane + 32 <= NB ? hist[lane + 32] : 0;
        cum = h0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) { const int n = __shfl_up_sync(FULL, cum, o); if (lane >= o) cum += n; }
        const int tot0 = __shfl_sync(FULL, cum, 31);
        int cum1 = h1;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) { const int n = __shfl_up_sync(FULL, cum1, o); if (lane >= o) cum1 += n; }
        cum1 += tot0;
        const bool lt0 = lane <= NB && cum < KC, lt1 = lane + 32 <= NB && cum1 < KC;    // cum: nondecreasing
        const int bstar = __popc(__ballot_sync(FULL, lt0)) + __popc(__ballot_sync(FULL, lt1));
        const int above = bstar == 0 ? 0 : __shfl_sync(FULL, bstar - 1 < 32 ? cum : cum1, (bstar - 1) & 31);
        if (lane == 0) { bs[0] = bstar; bs[1] = KC - above; }   // the boundary bucket gives KC - above, in order
    }
    __syncthreads();
    const int bstar = bs[0], need = bs[1];
    int na = 0, ni = 0;                             // one scan of both counts: above the boundary | in it
#pragma unroll
    for (int j = 0; j < CPT; j++) { na += bk[j] < bstar; ni += bk[j] == bstar; }
    const int pre = block_excl_scan(na << 16 | ni, tot, lane, warp);
    int ar = pre >> 16, ir = pre & 0xFFFF;          // slot = taken before = above before + min(boundary before, need)
#pragma unroll
    for (int j = 0; j < CPT; j++) {
        if (bk[j] < bstar) {
            const int slot = ar + min(ir, need);
            sidx[slot] = c * C + t * CPT + j; sxv[slot] = xv[j]; ar++;
        } else if (bk[j] == bstar) {
            if (ir < need) { sidx[ar + ir] = c * C + t * CPT + j; sxv[ar + ir] = xv[j]; }
            ir++;
        }
    }
    __syncthreads();
}
// x [K] (one token, 16-bit); thr [n, NB] float32, descending per chunk; codes [K, W] int32 (host, mapped: 8 columns
// per word, nibble e = column 8w + e, code q - 8); ws [n, 8W] float32. CTA (bx, by): chunks CH bx .. CH bx + CH - 1
// (of nch), words (by WPT + v) THREADS + t: selection of each chunk in turn, then every row's loads in flight at once.
// The qdec1 kernel below, or (INGRID) the leading CTAs of w4mma's own grid (specq.kernels.w4mma, QI).
__device__ __forceinline__ void qdec1_cta(const u16* __restrict__ x, const float* __restrict__ thr, const u32* codes,
                                          float* ws, int W, int nch, int bx, int by)
{
    __shared__ float th[CH][NB];
    __shared__ int hist[64];
    __shared__ int tot[THREADS / 32];
    __shared__ int sidx[CH][KC];
    __shared__ float sxv[CH][KC];
    __shared__ int bs[2];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, c0 = bx * CH;
    const int nc = min(CH, nch - c0);
    for (int i = t; i < nc * NB; i += THREADS)      // constants: read before the wait
        th[i / NB][i % NB] = thr[c0 * NB + i];
#if PDL && !AFTER      // launched after x's producer: wait for it
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#ifndef QDIAG
#define QDIAG 0
#endif
#if QDIAG < 2           // diagnostics (bench/dev only): 1 = no fetch, 2 = neither selection nor fetch
    for (int cc = 0; cc < nc; cc++)
        select_chunk(x, th[cc], c0 + cc, hist, tot, bs, sidx[cc], sxv[cc], t, lane, warp);
#else
    if (t < CH * KC) { sidx[t / KC][t % KC] = t; sxv[t / KC][t % KC] = 0.f; }
    __syncthreads();
#endif
    u32 q[WPT][CH][KC];                             // WPT words (8 columns each) per thread and row, all in flight
#pragma unroll
    for (int v = 0; v < WPT; v++) {
        const int w = (by * WPT + v) * THREADS + t;
#pragma unroll
        for (int cc = 0; cc < CH; cc++)
#pragma unroll
            for (int s = 0; s < KC; s++) q[v][cc][s] = w < W && cc < nc ? (QDIAG ? (u32)sidx[cc][s] : ldh(codes + (size_t)sidx[cc][s] * W + w)) : 0u;
    }
#pragma unroll
    for (int v = 0; v < WPT; v++) {
        const int w = (by * WPT + v) * THREADS + t;
#pragma unroll
        for (int cc = 0; cc < CH; cc++) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int s = 0; s < KC; s++) {
                const float xs = sxv[cc][s];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] += xs * (float)((int)((q[v][cc][s] >> (4 * e)) & 15u) - 8);
            }
            if (w < W && cc < nc) {
                float4* o = (float4*)(ws + (size_t)(c0 + cc) * W * 8 + (size_t)w * 8);
                o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
                o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
            }
        }
    }
#if PDL && AFTER       // launched after its GEMV, which waited for x's producer before letting this launch: x is ready;
    asm volatile("griddepcontrol.wait;" ::: "memory");  // complete only after the GEMV, so the next kernel's wait
#endif                                                  // on this one covers the GEMV's partials too
}
"""
_KERNEL = r"""
extern "C" __global__ void __launch_bounds__(THREADS)
qdec1(const u16* __restrict__ x, const float* __restrict__ thr, const u32* codes, float* __restrict__ ws, int W,
      int nch)
{
    qdec1_cta(x, thr, codes, ws, W, nch, blockIdx.x, blockIdx.y);
}
"""


def defines(C: int, KC: int, NB: int, pdl: bool | None, wpt: int, threads: int, ch: int, after: bool) -> str:
    """qdec1's compile-time constants (pdl None: left to the including source, w4mma's)."""
    return (f"#define C {C}\n#define KC {KC}\n#define NB {NB}\n#define CPT {-(-C // threads)}\n"
            f"#define THREADS {threads}\n#define WPT {wpt}\n#define CH {ch}\n#define AFTER {int(after)}\n"
            + (f"#define PDL {int(pdl)}\n" if pdl is not None else ""))


def source(C: int, KC: int, NB: int, fp16: bool, pdl: bool, wpt: int = 1, threads: int = THREADS, ch: int = 1,
           after: bool = False) -> str:
    magic, ht, et = ("0x64006400", "f16x2", "f16") if fp16 else ("0x43004300", "bf16x2", "bf16")
    head = (defines(C, KC, NB, pdl, wpt, threads, ch, after) +
            f"#define FP16 {int(fp16)}\n#define MAGIC_STR \"{magic}\"\n#define HTYPE \"{ht}\"\n"
            f"#define ETYPE \"{et}\"\n#define LDHINT \"\"\n")
    return head + helpers(fp16) + _SRC + _KERNEL


def usable(cl, x2: torch.Tensor, w) -> bool:
    """CompensatedLinear cl at one token on w4mma's weight w (MMAWeight): approx selector, 4-bit host codes."""
    return w is not None and usable_qdec1(cl, x2) and (x2.dtype == torch.float16) == w.fp16


def usable_qdec1(cl, x2: torch.Tensor) -> bool:
    """qdec1 takes cl at this input: one CUDA token (16-bit), approx selector, 4-bit host codes, k_chunk <= MAX_KC."""
    R = cl.residual
    return (x2.is_cuda and x2.shape[0] == 1 and cl.selector == "approx" and R.dense is None
            and 0 < cl.k_chunk <= min(MAX_KC, cl.chunk) and R.N % 8 == 0 and cl.thr is not None
            and w4mma.available() and x2.dtype in (torch.float16, torch.bfloat16))


def launch_shape(N: int, K: int, n: int, W: int, sms: int) -> tuple[int, int, int]:
    """qdec1's (threads, words per thread, chunks per CTA) beside w4mma's one-token grid for an N x K weight (n chunks,
    W words per residual row). Default: 256 threads, one chunk per CTA, 2 words per thread on wide rows. Beside a
    one-wave w4mma grid, qdec1 must fit in the CTA slots that grid leaves free (a qdec1 CTA, no larger than a w4mma
    CTA, takes the place of at most one), else w4mma CTAs wait for a second wave (Llama-3-8B down_proj: 28 qdec1
    CTAs pushed 20 of 256 out, bench/results/h100/qdec_fused_dev.txt, session 13): then the fewest chunks per CTA
    that fit, with as many threads as a w4mma CTA has."""
    shape = (THREADS, WPT_WIDE if W >= WIDE_W else 1, 1)
    c = w4mma.default_config(1, N, K, sms)
    spare = c.MINB * sms - N // 16

    def ctas(th, wp, ch):
        return -(-n // ch) * -(-W // (th * wp))

    if spare < 0 or ctas(*shape) <= spare:          # many waves, or it fits as it is
        return shape
    for ch in range(1, n + 1):
        for th in (512, 256):
            for wp in (1, 2):
                if th <= c.WARPS * 32 and ctas(th, wp, ch) <= spare:
                    return th, wp, ch
    return shape


def _thr(cl, x2: torch.Tensor) -> torch.Tensor:
    if cl.thr.dtype != torch.float32 or not cl.thr.is_contiguous() or cl.thr.device != x2.device:
        cl.thr = cl.thr.to(x2.device, torch.float32).contiguous()
    return cl.thr


def partials(cl, x2: torch.Tensor, fp16: bool, beside_w4mma: bool = True, after: bool = False) -> torch.Tensor:
    """Launch qdec1 alone: x2 [1, K] -> ws float32 [n, N] (PDL launch inside CUDA-graph capture on sm_90+).
    beside_w4mma: shape it to fit beside w4mma's one-token grid (launch_shape); else the default shape.
    after: launched right after the GEMV (which waited for x's producer): no wait at the start, a wait at the end."""
    from .kernel import mapped
    R = cl.residual
    n, C, KC = cl.n_chunks, cl.chunk, cl.k_chunk
    NB, W = _thr(cl, x2).shape[1], R.N // 8
    x2 = x2.contiguous()
    ws = torch.empty(n, R.N, dtype=torch.float32, device=x2.device)
    with torch.cuda.device(x2.device):
        on = PDL.enabled(x2.device)
        th, wpt, ch = (launch_shape(R.N, cl.in_features, n, W, w4mma._sms(x2.device)) if beside_w4mma
                       else (THREADS, WPT_WIDE if W >= WIDE_W else 1, 1))
        k = w4mma.compiled(("qdec1", C, KC, NB, fp16, x2.device.index or 0, on, wpt, th, ch, after),
                           lambda: source(C, KC, NB, fp16, on, wpt, th, ch, after), "qdec1")
        PDL.launch(k, (-(-n // ch), -(-W // (th * wpt)), 1), (th, 1, 1), [x2, cl.thr, mapped(R.codes), ws, W, n],
                   pdl=on and torch.cuda.is_current_stream_capturing())
    return ws


def partials_ref(cl, x2: torch.Tensor) -> torch.Tensor:
    """What qdec1 computes, in torch: ws [n, N] = per chunk, sum over its selected channels s of x[s] (q(R[s]) - 8)."""
    from .residual import unpack_rows
    R = cl.residual
    idx = cl.select(x2.float()).view(cl.n_chunks, cl.k_chunk).cpu()                    # [n, KC]
    q = (unpack_rows(R.codes[idx.reshape(-1)]) - 8).float().view(cl.n_chunks, cl.k_chunk, R.N)
    xs = x2.float().cpu()[0, idx]                                                      # [n, KC]
    return torch.einsum("nk,nkc->nc", xs, q)


INGRID = os.environ.get("SPECQ_QDEC_INGRID", "1") != "0"   # A/B switch: 0 = qdec1 as its own kernel before w4mma
DIAG = ""              # bench/dev: "#define QDIAG n" in the in-grid CTAs: 1 no fetch, 2 no selection either, 3 they exit
                       # at once and the epilogue adds nothing, 4 as 2 but the epilogue adds nothing (w4mma.py)
MAX_QREGS = 24         # in-grid: qdec1's words in flight per thread (WPT * CH * KC) within w4mma's register budget
_QP: dict = {}


def ingrid_shape(N: int, K: int, n: int, W: int, sms: int, KC: int) -> tuple[int, int, int] | None:
    """(threads, words per thread, chunks per CTA) of qdec1's CTAs inside w4mma's one-token grid for an N x K weight
    (n chunks, W words per residual row, KC channels per chunk), or None where they do not fit: with as many threads
    as a w4mma CTA; beside a one-wave grid no more CTAs than the slots it leaves (else w4mma CTAs wait for a second
    wave); at most MAX_QREGS residual words in flight per thread (w4mma's register cap)."""
    c = w4mma.default_config(1, N, K, sms)
    th, slots, T = c.WARPS * 32, c.MINB * sms, N // 16

    def ctas(wp, ch):
        return -(-n // ch) * -(-W // (th * wp))
    if T > slots:                                   # many waves: CTA slots free up as tiles finish
        wp = 2 if W >= 4 * th else 1
        return (th, wp, 1) if wp * KC <= MAX_QREGS else (th, 1, 1) if KC <= MAX_QREGS else None
    for ch in range(1, n + 1):
        for wp in (1, 2):
            if ctas(wp, ch) <= slots - T and wp * ch * KC <= MAX_QREGS:
                return th, wp, ch
    return None


def _qp(w, n: int, device) -> torch.Tensor:
    """Per (weight, chunks): the in-grid partials float32 [n, N], QG_EMPTY between launches (each is reset by the
    CTA that adds it). Allocated on the first (eager) call, before any graph capture."""
    key = (w.words.data_ptr(), n, str(device))
    q = _QP.get(key)
    if q is None:
        if torch.cuda.is_current_stream_capturing():
            raise SpecqError("w4mma: run a compensated Linear once eagerly before capturing it")
        q = _QP[key] = torch.full((n, w.N), -1, dtype=torch.int32, device=device).view(torch.float32)
    return q


def linear_ingrid(cl, x2: torch.Tensor, w) -> torch.Tensor | None:
    """x2 [1, K] -> base(x2) + compensation [1, N] in one w4mma launch whose first CTAs are qdec1's (w4mma QI): the
    GEMV's CTAs are the direct programmatic dependents of the previous kernel, as without compensation, and poll the
    partials in their epilogue. None where ingrid_shape() says they do not fit."""
    from .kernel import mapped
    R, thr = cl.residual, _thr(cl, x2)
    key = (cl.k_chunk, thr.data_ptr(), x2.device, DIAG)      # the launch description, once per setting (hot path)
    hit = cl.__dict__.get("_qi")
    if hit is None or hit[0] != key:
        n, C, KC, W = cl.n_chunks, cl.chunk, cl.k_chunk, R.N // 8
        shape = ingrid_shape(R.N, cl.in_features, n, W, w4mma._sms(x2.device), KC)
        qi = None
        if shape is not None:
            th, wpt, ch = shape
            qny = -(-W // (th * wpt))
            qi = (-(-n // ch) * qny, qny, n, defines(C, KC, thr.shape[1], None, wpt, th, ch, False) + DIAG, _SRC,
                  thr, mapped(R.codes))
        hit = cl.__dict__["_qi"] = (key, qi)
    qi = hit[1]
    if qi is None:
        return None
    n = cl.n_chunks
    return w4mma.w4mma_linear(x2.contiguous(), w, comp=(_qp(w, n, x2.device), R.scales_on(x2.device).float(), n, qi))


def linear(cl, x2: torch.Tensor, w) -> torch.Tensor:
    """x2 [1, K] -> base(x2) + compensation [1, N] (usable() said so)."""
    if INGRID:
        y = linear_ingrid(cl, x2, w)
        if y is not None:
            return y
    ws = partials(cl, x2, w.fp16)
    return w4mma.w4mma_linear(x2.contiguous(), w, comp=(ws, cl.residual.scales_on(x2.device).float(), cl.n_chunks))


def linear_w3(cl, x2: torch.Tensor, w) -> torch.Tensor:
    """x2 [1, K] -> base(x2) + compensation [1, N] on the W3A16 kernel's weight w (usable_qdec1() said so): the 3-bit
    GEMV, then qdec1 (AFTER: under PDL it launches when the GEMV's last programs are dispatched - the GEMV is
    several waves and compute-bound, so qdec1 first had slowed it by taking SM slots - and it waits for the GEMV at
    its end), then the split-K reduction, which adds scale * sum of the partials before the one rounding."""
    from ..kernels.w3a16 import w3a16_linear
    return w3a16_linear(x2.contiguous(), w, comp_fn=lambda: (
        partials(cl, x2, x2.dtype == torch.float16, beside_w4mma=False, after=True),
        cl.residual.scales_on(x2.device).float()))
