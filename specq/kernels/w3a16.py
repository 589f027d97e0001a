"""W3A16 (3-bit weights, bf16/fp16 activations) on CUDA: one Triton tensor-core kernel for any M, behind the
3-bit WQLinear (specq.quant.wq.register_kernel(..., bits=3)).

Kernel layout (prepare_w3a16, once per weight): the codes q [N, K] (0..7) split into their low two bits and their
high bit, each packed along K and stored transposed, so that a program's loads along N are contiguous:
    lo  int32 [K/16, N]   bits 2j, 2j+1 of word (i, n) = q[n, 16 i + j] & 3
    hi  int32 [K/32, N]   bit j of word (i, n)         = q[n, 32 i + j] >> 2
    s, z      [K/G, N]    scales and zero points in the activation dtype
(3 bits per weight, as stored). A program takes BN output columns, BM tokens and a K slice; per BK-k block it
dequantizes the [BK, BN] tile W^T = (q - z) * s in fp32 (exact: a small integer times a 16-bit float) and rounds it
once to the activation dtype, as the reference does, then accumulates x_tile @ W^T_tile in fp32 (tl.dot). K is
split so that the grid has up to 4 (<= 16 tokens) or 2 programs per SM; the splits' fp32 partials are summed in a
fixed order (torch), so results are deterministic.
Correct but not fast (H100, Llama-3-8B layer: 158.5 us at one token, about bf16 cuBLAS; bench/results/h100/
kernels.json): the dequantization of every tile, through reshapes and broadcasts, costs more than the 3-bit loads
save. A fast 3-bit path would need the W4A16 kernels' per-lane fragment layouts.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

from ..errors import SpecqError
from ..quant import pack as P
from . import w4mma
from .common import HAS_TRITON, INTERPRET, pdl_launch, tl, triton, use_triton


ROWS = 2048           # rows per chunk of the one-time repack


class W3A16Weight(NamedTuple):
    lo: torch.Tensor        # int32 [K/16, N]
    hi: torch.Tensor        # int32 [K/32, N]
    s: torch.Tensor         # [K/G, N]
    z: torch.Tensor         # [K/G, N]
    N: int
    K: int
    G: int


def prepare_w3a16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, K: int,
                  dtype=torch.bfloat16) -> W3A16Weight:
    """WQLinear's 3-bit buffers (qweight int32 [N, 3K/32], scales / zeros [N, K/G]) -> the kernel layout."""
    N = qweight.shape[0]
    G = K if group_size in (None, 0, -1) else int(group_size)
    if K % 32 or G % 32 or K % G or tuple(qweight.shape) != (N, 3 * K // 32):
        raise SpecqError(f"w3a16: K={K} (multiple of 32), group {group_size} (multiple of 32 dividing K) and qweight "
                         f"{tuple(qweight.shape)} (expected ({N}, {3 * K // 32})) do not fit")
    lo, hi = [], []
    for r in range(0, N, ROWS):                                  # in row chunks: the bit unpacking is int64 wide
        q = P.unpack(qweight[r:r + ROWS], 3, K).to(torch.int64)  # [rows, K]
        lo.append(P.pack(q & 3, 2))                              # [rows, K/16]
        hi.append(P.pack(q >> 2, 1))                             # [rows, K/32]
    return W3A16Weight(torch.cat(lo).t().contiguous(), torch.cat(hi).t().contiguous(),
                       scales.to(dtype).t().contiguous(), zeros.to(dtype).t().contiguous(), N, K, G)


def pack3(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..7) -> WQLinear's 3-bit qweight int32 [N, 3K/32] (specq.quant.pack.pack, in row chunks)."""
    return torch.cat([P.pack(q[r:r + ROWS], 3) for r in range(0, q.shape[0], ROWS)])


def dequant_ref(w: W3A16Weight) -> torch.Tensor:
    """[N, K] in the weight's dtype from the kernel layout (the math the kernel does, in torch)."""
    j16 = torch.arange(16, device=w.lo.device) * 2
    j32 = torch.arange(32, device=w.hi.device)
    lo = ((w.lo.to(torch.int64)[:, None, :] >> j16[None, :, None]) & 3).reshape(w.K, w.N)
    hi = ((w.hi.to(torch.int64)[:, None, :] >> j32[None, :, None]) & 1).reshape(w.K, w.N)
    q = (lo | (hi << 2)).float()
    s = w.s.float().repeat_interleave(w.G, 0)
    z = w.z.float().repeat_interleave(w.G, 0)
    return ((q - z) * s).to(w.s.dtype).t()


if HAS_TRITON:
    from .common import pdl_enter

    @triton.jit
    def _w3a16_kernel(x_ptr, lo_ptr, hi_ptr, s_ptr, z_ptr, ws_ptr, M, N, sxm, KPER, G: tl.constexpr,
                      NG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      F32DOT: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)
        pn, pk, pm = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rn = pn * BN + tl.arange(0, BN)
        rm = pm * BM + tl.arange(0, BM)
        nmask = rn < N
        mmask = rm < M
        GT: tl.constexpr = BK // NG                       # NG: groups per k block (1 when G >= BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        j16 = 2 * tl.arange(0, 16)
        j32 = tl.arange(0, 32)
        for k0 in range(pk * KPER, pk * KPER + KPER, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=mmask[:, None], other=0.0)      # [BM, BK]
            lw = tl.load(lo_ptr + (k0 // 16 + tl.arange(0, BK // 16))[:, None] * N + rn[None, :],
                         mask=nmask[None, :], other=0)                                               # [BK/16, BN]
            hw = tl.load(hi_ptr + (k0 // 32 + tl.arange(0, BK // 32))[:, None] * N + rn[None, :],
                         mask=nmask[None, :], other=0)                                               # [BK/32, BN]
            lo = tl.reshape((lw[:, None, :] >> j16[None, :, None]) & 3, [BK, BN])
            hi = tl.reshape((hw[:, None, :] >> j32[None, :, None]) & 1, [BK, BN])
            q = (lo | (hi << 2)).to(tl.float32)
            gi = k0 // G + tl.arange(0, NG)
            sc = tl.load(s_ptr + gi[:, None] * N + rn[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + gi[:, None] * N + rn[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
            sc = tl.reshape(tl.broadcast_to(sc[:, None, :], [NG, GT, BN]), [BK, BN])
            zc = tl.reshape(tl.broadcast_to(zc[:, None, :], [NG, GT, BN]), [BK, BN])
            wt = ((q - zc) * sc).to(xt.dtype)                                                        # [BK, BN]
            if F32DOT:     # the interpreter's bf16 dot is wrong (as in w4a16.py): fp32 there, the same products
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32))
            else:
                acc += tl.dot(xt, wt)
        tl.store(ws_ptr + pk * M * N + rm[:, None] * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _w3_reduce_kernel(ws_ptr, y_ptr, qws_ptr, qsc_ptr, MN, N, SPLIT: tl.constexpr, NC: tl.constexpr,
                          COMP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # y [M, N] = sum_s ws[s] (+ scale[n] * sum_c qws[c, n] for one token) in fp32, rounded once
        pdl_enter(PDL)
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = r < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(ws_ptr + s * MN + r, mask=mask, other=0.0)
        if COMP:
            c = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(NC):
                c += tl.load(qws_ptr + j * N + r, mask=mask, other=0.0)
            acc += tl.load(qsc_ptr + r, mask=mask, other=0.0) * c
        tl.store(y_ptr + r, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _sms(device) -> int:
    return w4mma._sms(device) if device.type == "cuda" else 8     # 8: the interpreter's stand-in


# defaults from bench/dev/w3_sweep.py (H100, Llama-3-8B layer; 16 configs): BN 128, BK 128, 4 warps, at most 4
# programs per SM up to 16 tokens (158.6 / 165.9 us per layer at M = 1 / 16) and 2 beyond (205.5 at 64)
BN, BK_MAX, WARPS = 128, 128, 4


def programs_per_sm(M: int) -> int:
    return 4 if M <= 16 else 2


def config(M: int, N: int, K: int, G: int, sms: int, bn: int | None = None, bk: int | None = None,
           per_sm: int | None = None) -> tuple[int, int, int, int]:
    """(BM, BN, BK, split): BK the largest of BK_MAX / 64 / 32 dividing K and a multiple or divisor of G; K split
    over programs (whole BK blocks, equal slices) for at most programs_per_sm(M) programs per SM."""
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    bn = bn or BN
    BK = next(b for b in (bk or BK_MAX, 64, 32) if K % b == 0 and (b % G == 0 or G % b == 0))
    tiles = -(-N // bn) * -(-M // BM)
    nb = K // BK
    cap = (per_sm or programs_per_sm(M)) * sms
    split = max((s for s in range(1, nb + 1) if nb % s == 0 and tiles * s <= cap), default=1)
    return BM, bn, BK, split


REDUCE_BLOCK = 1024


def w3a16_gemv(x: torch.Tensor, w: W3A16Weight, cfg: tuple | None = None) -> torch.Tensor:
    """The GEMV's launch alone (x [M, K] contiguous, 16-bit, Triton): -> fp32 split-K partials ws [split, M, N]."""
    M, K = x.shape
    bn, bk, per_sm, warps = cfg or (None, None, None, WARPS)
    BM, BN, BK, split = config(M, w.N, K, w.G, _sms(x.device), bn, bk, per_sm)
    ws = torch.empty(split, M, w.N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(w.N, BN), split, triton.cdiv(M, BM))
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        P, kw = pdl_launch(x.device)
        _w3a16_kernel[grid](x, w.lo, w.hi, w.s, w.z, ws, M, w.N, x.stride(0), K // split,
                            G=w.G, NG=max(BK // w.G, 1), BM=BM, BN=BN, BK=BK,
                            F32DOT=INTERPRET, PDL=P, num_warps=warps, **kw)
    return ws


def w3a16_reduce(ws: torch.Tensor, dtype, comp: tuple | None = None) -> torch.Tensor:
    """ws [split, M, N] fp32 -> y [M, N] = sum of the splits (+ scale * sum_c qws[c] for comp = (qws [n, N] fp32,
    scale [N] fp32), one token), rounded once to dtype."""
    split, M, N = ws.shape
    y = torch.empty(M, N, dtype=dtype, device=ws.device)
    qws, qsc = comp if comp is not None else (ws, ws)
    with torch.cuda.device(ws.device) if ws.is_cuda else nullcontext():
        P, kw = pdl_launch(ws.device)
        _w3_reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
            ws, y, qws, qsc, M * N, N, SPLIT=split, NC=qws.shape[0] if comp is not None else 0,
            COMP=comp is not None, BLOCK=REDUCE_BLOCK, PDL=P, num_warps=4, **kw)
    return y


def w3a16_linear(x: torch.Tensor, w: W3A16Weight, cfg: tuple | None = None, comp: tuple | None = None,
                 comp_fn=None) -> torch.Tensor:
    """x [M, K] (16-bit; CUDA, or any device under TRITON_INTERPRET=1) @ W^T -> [M, N]; elsewhere the reference.
    cfg: (BN, BK, programs per SM, warps) for sweeps.
    One token with compensation partials: y = x @ W^T + scale * sum_c qws[c], in fp32 before the one rounding, for
    comp = (qws [n, N] fp32, scale [N] fp32), or comp_fn() -> comp launched between the GEMV and its split-K
    reduction (specq.compensate.mma.linear_w3: under programmatic dependent launch the compensation kernel then
    starts when the GEMV's last programs have been dispatched, so it takes no SM slot a GEMV program waits for)."""
    M, K = x.shape
    if K != w.K:
        raise SpecqError(f"w3a16: x {tuple(x.shape)} against weight K={w.K}")
    if comp_fn is not None:
        if comp is not None:
            raise SpecqError("w3a16: comp and comp_fn together")
    if comp is not None or comp_fn is not None:
        if M != 1:
            raise SpecqError(f"w3a16: compensation partials need one token, got {M}")
    if not use_triton(x) or x.dtype not in (torch.bfloat16, torch.float16) or x.dtype != w.s.dtype:
        y = x @ dequant_ref(w).to(x.dtype).t()
        comp = comp_fn() if comp_fn is not None else comp
        if comp is not None:
            _check_comp(comp, w)
            y = (y.float() + comp[1].to(y.device) * comp[0].to(y.device).sum(0)).to(x.dtype)
        return y
    if comp is not None:
        _check_comp(comp, w)
    x = x if x.stride(-1) == 1 else x.contiguous()
    ws = w3a16_gemv(x, w, cfg)
    if comp_fn is not None:
        comp = comp_fn()
        _check_comp(comp, w)
    return w3a16_reduce(ws, x.dtype, comp)


def _check_comp(comp, w):
    if comp[0].dim() != 2 or comp[0].shape[1] != w.N or comp[1].shape != (w.N,):
        raise SpecqError(f"w3a16: compensation partials {tuple(comp[0].shape)} / scale {tuple(comp[1].shape)} "
                         f"do not fit N={w.N}")
