"""GPU path of CompensatedLinear: two small Triton kernels on a side stream, beside the quantized GEMV.

    main:  record ready ──────────── base GEMV y = Q(W) x ───────── wait done; y += r
    side:  wait ready; select (idx, x[S]) [M, k]; fetch r = x[S] @ R[S] [M, N]; record done

select: one program per (token row, chunk): bucket top-k (compares, one histogram, prefix sums), or
        torch.topk for the exact selector. fetch: one program per (row, block of output columns): loads the chosen
        rows of the 4-bit residual straight from pinned host memory through its mapped device
        pointer (zero-copy over PCIe: only k rows are read), dequantizes, accumulates in fp32.
Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (the tests use this).
"""
from __future__ import annotations

import ctypes

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - machines without triton
    triton = tl = None
    HAS_TRITON = False

_SIDE: dict = {}
_DEVPTR: dict = {}
# int32 words (8 columns each) of a residual row per fetch program: 16 was 1-5% faster than 32 / 64 / 128 and
# much faster than 8 / 4 on the H100 (bench/dev/qdec_variants.py, qdec_fused_dev.txt session 5)
FETCH_BLOCK_W = 16
HOST_ARG = "mapped"          # how the host residual reaches Triton: "mapped" pointer wrapper or "pinned-tensor"


def available() -> bool:
    return HAS_TRITON and torch.cuda.is_available()


class HostPtr:
    """A pinned host tensor seen through its device-mapped address (what Triton reads from)."""

    def __init__(self, t: torch.Tensor, ptr: int):
        self.t, self.ptr, self.dtype, self.shape = t, ptr, t.dtype, t.shape

    def data_ptr(self):
        return self.ptr


def mapped(t: torch.Tensor):
    """Device-side pointer of pinned host tensor t (cuMemHostGetDevicePointer; with unified addressing
    it equals the host address). Cached per tensor."""
    if not t.is_pinned():
        raise RuntimeError("residual codes are not in pinned memory")
    key = t.data_ptr()
    if key not in _DEVPTR:
        ptr = key
        try:
            cuda = ctypes.CDLL("libcuda.so.1")
            dp = ctypes.c_uint64(0)
            if cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(dp), ctypes.c_void_p(key), 0) == 0:
                ptr = dp.value
        except OSError:
            pass
        _DEVPTR[key] = HostPtr(t, ptr)
    return _DEVPTR[key]


if HAS_TRITON:
    from ..kernels.w4a16 import finish_tile

    @triton.jit
    def _select_chunk(x_ptr, thr_ptr, idx_ptr, xs_ptr, c, C: tl.constexpr, KC: tl.constexpr, NB: tl.constexpr,
                      BLOCK_C: tl.constexpr, NBINS: tl.constexpr):
        """Bucket top-KC of chunk c of one row x_ptr[0..K): channel ids -> idx_ptr[0..KC), x there -> xs_ptr."""
        offs = tl.arange(0, BLOCK_C)
        valid = offs < C
        x = tl.load(x_ptr + c * C + offs, mask=valid, other=0.0).to(tl.float32)
        a = tl.abs(x)
        bucket = tl.zeros([BLOCK_C], dtype=tl.int32)           # number of thresholds above |x|
        for b in tl.static_range(NB):
            t = tl.load(thr_ptr + c * NB + b)
            bucket += (a < t).to(tl.int32)
        bucket = tl.where(valid, bucket, NB + 1)
        # one histogram instead of NB + 1 block reductions (those took 7-12 us per launch on the H100)
        hist = tl.histogram(bucket, NBINS)                     # [NBINS] channels per bucket
        bins = tl.arange(0, NBINS)
        cum = tl.cumsum(hist, axis=0)                          # channels in buckets <= b
        bstar = tl.sum(((cum < KC) & (bins <= NB)).to(tl.int32), axis=0)   # first bucket reaching KC
        above = tl.sum(tl.where(bins < bstar, hist, 0), axis=0)
        inb = bucket == bstar
        rank = tl.cumsum(inb.to(tl.int32), axis=0)
        sel = (bucket < bstar) | (inb & (rank <= KC - above))
        slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + slot, (c * C + offs).to(tl.int32), mask=sel)
        tl.store(xs_ptr + slot, x, mask=sel)

    @triton.jit
    def _select_kernel(x_ptr, thr_ptr, idx_ptr, xs_ptr, K, C: tl.constexpr, KC: tl.constexpr, NB: tl.constexpr,
                       BLOCK_C: tl.constexpr, NBINS: tl.constexpr):
        m = tl.program_id(0)
        c = tl.program_id(1)
        base = (m * tl.num_programs(1) + c) * KC
        _select_chunk(x_ptr + m * K, thr_ptr, idx_ptr + base, xs_ptr + base, c, C, KC, NB, BLOCK_C, NBINS)

    @triton.jit
    def _gather(idx_ptr, xs_ptr, codes_ptr, w, wm, W, KSEL, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr):
        """sum_s xs[s] * (q(R[idx[s], words w]) - 8) -> fp32 [BLOCK_W, 8] (columns 8w .. 8w + 7, unscaled)."""
        sh = tl.arange(0, 8) * 4
        acc = tl.zeros([BLOCK_W, 8], dtype=tl.float32)
        for s0 in range(0, KSEL, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            sm = s < KSEL
            rows = tl.load(idx_ptr + s, mask=sm, other=0).to(tl.int64)
            xv = tl.load(xs_ptr + s, mask=sm, other=0.0).to(tl.float32)
            words = tl.load(codes_ptr + rows[:, None] * W + w[None, :], mask=sm[:, None] & wm[None, :], other=0)
            q = ((words[:, :, None] >> sh[None, None, :]) & 15).to(tl.float32) - 8.0    # [S, BW, 8]
            acc += tl.sum(xv[:, None, None] * q, axis=0)
        return acc

    @triton.jit
    def _fetch_kernel(idx_ptr, xs_ptr, codes_ptr, scales_ptr, out_ptr, N, W, KSEL,
                      BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr):
        pid = tl.program_id(0)
        m = tl.program_id(1)
        w = pid * BLOCK_W + tl.arange(0, BLOCK_W)
        wm = w < W
        acc = _gather(idx_ptr + m * KSEL, xs_ptr + m * KSEL, codes_ptr, w, wm, W, KSEL, BLOCK_S, BLOCK_W)
        cols = w[:, None] * 8 + tl.arange(0, 8)[None, :]
        cm = cols < N
        sc = tl.load(scales_ptr + cols, mask=cm, other=0.0)
        tl.store(out_ptr + m * N + cols, acc * sc, mask=cm)


if HAS_TRITON:
    @triton.jit
    def _arrive(ws_ptr, y_ptr, lock_ptr, pid, M, N, NPART, MT, BLOCK_W: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr):
        """Count this program on the locks of the W4A16 tiles its 8 * BLOCK_W columns cover (all MT m tiles);
        the last arrival on a tile sums its NPART partials in slot order into y (as the GEMV epilogue does)."""
        tl.debug_barrier()                     # the whole partial is written before any count
        TPP: tl.constexpr = 8 * BLOCK_W // BN
        for t in tl.static_range(TPP):
            pn = pid * TPP + t
            if pn * BN < N:
                rn = pn * BN + tl.arange(0, BN)
                for pm in range(MT):
                    lock = lock_ptr + pn * MT + pm
                    if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == NPART - 1:
                        rm = pm * BM + tl.arange(0, BM)
                        om = (rn < N)[:, None] & (rm < M)[None, :]
                        finish_tile(ws_ptr, y_ptr, lock, rm, rn, om, M, N, NPART, N)

    @triton.jit
    def _fetch_partial_kernel(idx_ptr, xs_ptr, codes_ptr, scales_ptr, ws_ptr, y_ptr, lock_ptr, M, N, W, KSEL, SLOT,
                              NPART, MT, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr, BM: tl.constexpr,
                              BN: tl.constexpr):
        """_fetch_kernel writing partial SLOT of a split-K W4A16 launch (specq.kernels.w4a16.Partial) for all
        M rows of its 8 * BLOCK_W columns, then _arrive (8 * BLOCK_W % BN == 0)."""
        pid = tl.program_id(0)
        w = pid * BLOCK_W + tl.arange(0, BLOCK_W)
        wm = w < W
        cols = w[:, None] * 8 + tl.arange(0, 8)[None, :]
        cm = cols < N
        sc = tl.load(scales_ptr + cols, mask=cm, other=0.0)
        for m in range(M):
            acc = _gather(idx_ptr + m * KSEL, xs_ptr + m * KSEL, codes_ptr, w, wm, W, KSEL, BLOCK_S, BLOCK_W)
            tl.store(ws_ptr + (SLOT * M + m) * N + cols, acc * sc, mask=cm)
        _arrive(ws_ptr, y_ptr, lock_ptr, pid, M, N, NPART, MT, BLOCK_W, BM, BN)


def select(cl, x2: torch.Tensor):
    """x2 [M, K] -> idx int32 [M, k], xs float32 [M, k] (x at the selected channels)."""
    M, K = x2.shape
    if cl.selector == "exact":
        idx = x2.abs().topk(cl.k, dim=1, sorted=False).indices
        return idx.to(torch.int32), torch.gather(x2, 1, idx).float()
    n, C, kc = cl.n_chunks, cl.chunk, cl.k_chunk
    idx = torch.empty(M, n * kc, dtype=torch.int32, device=x2.device)
    xs = torch.empty(M, n * kc, dtype=torch.float32, device=x2.device)
    thr = cl.thr.to(device=x2.device, dtype=torch.float32).contiguous()
    _select_kernel[(M, n)](x2.contiguous(), thr, idx, xs, K, C=C, KC=kc, NB=thr.shape[1],
                           BLOCK_C=triton.next_power_of_2(C), NBINS=triton.next_power_of_2(thr.shape[1] + 2))
    return idx, xs


def fetch(res, idx: torch.Tensor, xs: torch.Tensor, codes=None, block_w: int | None = None) -> torch.Tensor:
    """r [M, N] float32 = sum_s xs[m, s] * R[idx[m, s], :] with R's 4-bit rows read from `codes`."""
    M, ksel = idx.shape
    N, W = res.N, res.N // 8
    out = torch.empty(M, N, dtype=torch.float32, device=xs.device)
    global HOST_ARG
    scales = res.scales_on(xs.device)
    bs = min(32, max(16, triton.next_power_of_2(ksel)))
    block_w = block_w or FETCH_BLOCK_W
    grid = (triton.cdiv(W, block_w), M)
    if codes is None and xs.is_cuda and HOST_ARG == "mapped":
        try:
            _fetch_kernel[grid](idx, xs, mapped(res.codes), scales, out, N, W, ksel, BLOCK_S=bs, BLOCK_W=block_w)
            return out
        except Exception:                      # this Triton does not take the wrapper: pass the pinned tensor
            HOST_ARG = "pinned-tensor"
    codes = res.codes if codes is None else codes
    _fetch_kernel[grid](idx, xs, codes, scales, out, N, W, ksel, BLOCK_S=bs, BLOCK_W=block_w)
    return out


def fetch_partial(res, idx: torch.Tensor, xs: torch.Tensor, t) -> None:
    """fetch() written as partial t.slot of a split-K W4A16 launch (t: specq.kernels.w4a16.Partial)."""
    M, ksel = idx.shape
    N, W = res.N, res.N // 8
    block_w = max(FETCH_BLOCK_W, t.BN // 8)
    bs = min(32, max(16, triton.next_power_of_2(ksel)))
    codes = mapped(res.codes) if xs.is_cuda else res.codes
    _fetch_partial_kernel[(triton.cdiv(W, block_w),)](idx, xs, codes, res.scales_on(xs.device), t.ws, t.y, t.locks,
                                                      M, N, W, ksel, t.slot, t.npart, t.m_tiles, BLOCK_S=bs,
                                                      BLOCK_W=block_w, BM=t.BM, BN=t.BN)


def fused(cl, x2: torch.Tensor, w, xq: torch.Tensor | None = None):
    """x2 [M, K] -> base(x2) + x2[S] @ R[S] with no add kernel (xq: the GEMV's input when its columns are
    permuted, else x2): the W4A16 GEMV (main stream) and the
    compensation (select + fetch_partial, side stream) each write split-K partials of one launch, and
    whichever finishes a tile last writes it. None when the W4A16 Triton path does not apply."""
    from ..kernels.w4a16 import w4a16_fused
    xq = x2 if xq is None else xq
    if not x2.is_cuda:                          # Triton interpreter (tests): the same kernels, in order
        return w4a16_fused(xq, w, lambda t: fetch_partial(cl.residual, *select(cl, x2), t))
    main = torch.cuda.current_stream(x2.device)
    side = _side(x2.device)

    def contribute(t):
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fetch_partial(cl.residual, *select(cl, x2), t)

    y = w4a16_fused(xq, w, contribute)
    if y is not None:
        main.wait_stream(side)
    return y


def _side(device):
    key = str(device)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=device)
    return _SIDE[key]


def compensate(cl, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """y2 [M, N] (the base output) + x2[S] @ R[S] for every row, computed on the side stream."""
    r = launch(cl, x2)
    return join(r, y2)


def launch(cl, x2: torch.Tensor):
    """Start the compensation of x2 [M, K] on the side stream; returns a handle for join()."""
    main = torch.cuda.current_stream(x2.device)
    side = _side(x2.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        if cl.residual.dense is not None:     # exact residual (tests): plain torch on the side stream
            idx, xs = select(cl, x2)
            rows = cl.residual.rows(idx.long().cpu()).to(x2.device, non_blocking=True)
            r = torch.einsum("mk,mkn->mn", xs, rows)
        else:
            idx, xs = select(cl, x2)
            r = fetch(cl.residual, idx, xs)
    if not torch.cuda.is_current_stream_capturing():
        r.record_stream(main)                  # r is freed on the main stream after the add
    return r, side


def join(handle, y2: torch.Tensor) -> torch.Tensor:
    r, side = handle
    torch.cuda.current_stream(y2.device).wait_stream(side)
    return y2.add_(r)
