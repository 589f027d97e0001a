"""W8A8 and W4A8: per-token dynamic int8 activations (one small quantize kernel), int8 tensor cores with
int32 accumulation (y^T = W @ xq^T), scales applied in the epilogue.

W4A8 weights are repacked once (prepare_w4a8) to two's-complement nibbles in 256-k blocks where nibble
j of 32 adjacent words is one contiguous 32-k slice (an int8 tl.dot operand needs k >= 32). On the GPU
four words become int8 values 16*c with prmt + shift + and (the nibble sits in the byte's high half,
so its sign needs no extension); the factor 16 is removed exactly in integer/fp32 arithmetic.
Group-128 (QQQ/QoQ style: int8 value = c * integer group scale): each group's int32 partial dot is
multiplied by its integer scale, which equals the dot with the int8 values c * gs exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import SpecqError
from .common import HAS_TRITON, INTERPRET, interleave_int4, tl, triton, use_asm, use_triton
from .ref import quant_act, w4a8_int8_weight

if HAS_TRITON:
    from .common import i4_to_i8x16_asm


class W8A8Weight(NamedTuple):
    w8: torch.Tensor        # int8 [N, K]
    sw: torch.Tensor        # float32 [N]


class W4A8Weight(NamedTuple):
    qweight: torch.Tensor   # int32 [N, K//8]: two's-complement nibbles, 32-word interleaved 256-k blocks
    sw: torch.Tensor        # float32 [N]
    gs: torch.Tensor | None  # int32 [N, K//128] integer group scales, or None (per channel)
    N: int
    K: int
    raw: tuple              # canonical (qweight, sw, gs) for the fallback path


def prepare_w8a8(w8, sw) -> W8A8Weight:
    if w8.dtype != torch.int8 or w8.dim() != 2 or sw.shape != (w8.shape[0],):
        raise SpecqError(f"bad W8A8 tensors: w8 {tuple(w8.shape)} {w8.dtype}, sw {tuple(sw.shape)}")
    return W8A8Weight(w8.contiguous(), sw.float().contiguous())


def prepare_w4a8(qweight, sw, group_scales=None) -> W4A8Weight:
    """Canonical 4-bit qweight (signed code c = q - 8), sw [N], int group scales [N, K//128] or None."""
    N, W = qweight.shape
    K = W * 8
    if qweight.dtype != torch.int32 or sw.shape != (N,) or (
            group_scales is not None and tuple(group_scales.shape) != (N, K // 128)):
        raise SpecqError(f"bad W4A8 tensors: qweight {tuple(qweight.shape)} {qweight.dtype}, sw "
                         f"{tuple(sw.shape)}, group scales {None if group_scales is None else tuple(group_scales.shape)}")
    gs = None if group_scales is None else group_scales.to(torch.int32).contiguous()
    if gs is not None and (gs.min() < 1 or gs.max() > 16):
        raise SpecqError("W4A8 integer group scales must lie in 1..16 (c * gs must fit int8)")
    packed = interleave_int4(qweight, 32, xor=8) if K % 256 == 0 else None
    return W4A8Weight(packed, sw.float().contiguous(), gs, N, K, (qweight, sw, group_scales))


def quantize_act(x):
    """x [M, K] -> (xq int8 [M, K], sx float32 [M]): Triton on CUDA, torch elsewhere."""
    if not use_triton(x):
        return quant_act(x)
    M, K = x.shape
    xq = torch.empty(M, K, dtype=torch.int8, device=x.device)
    sx = torch.empty(M, dtype=torch.float32, device=x.device)
    _quant_kernel[(M,)](x, xq, sx, K, x.stride(0), BLOCK=min(2048, triton.next_power_of_2(K)), num_warps=4)
    return xq, sx


# (BM, BN, R, num_warps, num_stages); R = 128-k (W8A8) or 256-k (W4A8) blocks per loop step.
# Picked from the H100 sweep of bench/kernels.py --sweep (Llama-3-8B shapes).
def default_config(M: int, N: int, K: int, w4: bool):
    wide = N >= 8192
    if M <= 16:
        if w4:
            return (16, 128, 1, 4, 3) if wide else (16, 32, 2, 4, 3)
        return (16, 32, 2, 4, 3) if wide else (16, 64, 2, 4, 3)
    if M <= 32:
        return (32, 128, 1, 8, 3) if wide else (32, 64, 2, 4, 3)
    return (64, 128, 1, 8, 3) if wide else (32, 64, 2, 4, 3) if M <= 64 else (64, 64, 2, 4, 3)


def w8a8_linear(x, w8, sw=None, cfg=None):
    """y [..., N] = x [..., K] @ (w8 * sw[:, None])^T with x quantized per token to int8."""
    w = w8 if isinstance(w8, W8A8Weight) else prepare_w8a8(w8, sw)
    N, K = w.w8.shape
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if x2.shape[1] != K:
        raise SpecqError(f"w8a8_linear: x has K={x2.shape[1]}, weight has K={K}")
    xq, sx = quantize_act(x2)
    if not use_triton(x2) or K % 128 or x2.shape[0] == 0:
        y = ((xq.float() @ w.w8.float().T) * sx[:, None] * w.sw[None, :])
        return y.to(x.dtype).reshape(*lead, N)
    y = _launch_i8(xq, sx, w.w8, w.sw, None, N, K, False, False, cfg, x.dtype)
    return y.reshape(*lead, N)


def w4a8_linear(x, qweight, sw=None, group_scales=None, cfg=None, asm=None):
    """y = x @ W^T, W = (q - 8) * group_scale * sw[n], x quantized per token to int8."""
    w = qweight if isinstance(qweight, W4A8Weight) else prepare_w4a8(qweight, sw, group_scales)
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if x2.shape[1] != w.K:
        raise SpecqError(f"w4a8_linear: x has K={x2.shape[1]}, weight has K={w.K}")
    xq, sx = quantize_act(x2)
    if not use_triton(x2) or w.qweight is None or x2.shape[0] == 0:
        q, s, g = w.raw
        y = (xq.double() @ w4a8_int8_weight(q, g).double().T) * sx.double()[:, None] * w.sw.double()[None, :]
        return y.to(x.dtype).reshape(*lead, w.N)
    asm = use_asm(x2) if asm is None else asm
    y = _launch_i8(xq, sx, w.qweight, w.sw, w.gs, w.N, w.K, True, asm, cfg, x.dtype)
    return y.reshape(*lead, w.N)


def _launch_i8(xq, sx, wt, sw, gs, N, K, w4, asm, cfg, dtype):
    M = xq.shape[0]
    BM, BN, R, nw, ns = cfg or default_config(M, N, K, w4)
    blk = 256 if w4 else 128
    while K % (blk * R):
        R //= 2
    y = torch.empty(M, N, dtype=dtype, device=xq.device)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _i8_kernel[grid](xq, sx, wt, sw, gs if gs is not None else sw, y, M, N, K, K // 128, y.stride(0),
                     BM=BM, BN=BN, R=R, W4=w4, GROUPED=gs is not None, USE_ASM=asm, F32DOT=INTERPRET,
                     num_warps=nw, num_stages=ns)
    return y


if HAS_TRITON:
    @triton.jit(do_not_specialize=["K"])
    def _quant_kernel(x_ptr, q_ptr, s_ptr, K, sxm, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        r = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K, BLOCK):
            v = tl.load(x_ptr + m * sxm + k + r, mask=k + r < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        sc = tl.maximum(tl.max(amax, axis=0), 1e-8) / 127.0
        for k in range(0, K, BLOCK):
            v = tl.load(x_ptr + m * sxm + k + r, mask=k + r < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.floor(v / sc + 0.5), -127.0), 127.0)
            tl.store(q_ptr + m * K + k + r, q.to(tl.int8), mask=k + r < K)
        tl.store(s_ptr + m, sc)

    @triton.jit
    def _dot8(acc, c, xq_ptr, k, rm, mmask, K, rk, F32DOT: tl.constexpr):
        """acc [BN, BM] int32 += c [BN, KS] int8 @ xq[:, k:k+KS]^T."""
        xt = tl.load(xq_ptr + rm[None, :] * K + (k + rk)[:, None], mask=mmask[None, :], other=0)
        if F32DOT:  # interpreter: exact in fp32 for these sizes
            return acc + tl.dot(c.to(tl.float32), xt.to(tl.float32)).to(tl.int32)
        return tl.dot(c, xt, acc, out_dtype=tl.int32)

    @triton.jit
    def _nib(words, j: tl.constexpr):
        """Plain path: signed nibble j of every word as int8."""
        return ((words << (28 - 4 * j)) >> 28).to(tl.int8)

    @triton.jit(do_not_specialize=["M"])
    def _i8_kernel(xq_ptr, sx_ptr, w_ptr, sw_ptr, gs_ptr, y_ptr, M, N, K, NGS, sym,
                   BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr, W4: tl.constexpr,
                   GROUPED: tl.constexpr, USE_ASM: tl.constexpr, F32DOT: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rnl = rn % N
        rm = pid_m * BM + tl.arange(0, BM)
        mmask = rm < M
        acc = tl.zeros([BN, BM], dtype=tl.int32)
        if W4:
            r32 = tl.arange(0, 32)
            wp = w_ptr + rnl[:, None] * (K // 8) + r32[None, :]               # [BN, 32] words
            for k0 in range(0, K, 256 * R):
                for r in tl.static_range(R):
                    kb = k0 + 256 * r
                    words = tl.load(wp + kb // 8)
                    if USE_ASM:
                        c0, c1, c2, c3, c4, c5, c6, c7 = i4_to_i8x16_asm(words)
                    else:
                        c0 = _nib(words, 0)
                        c1 = _nib(words, 1)
                        c2 = _nib(words, 2)
                        c3 = _nib(words, 3)
                        c4 = _nib(words, 4)
                        c5 = _nib(words, 5)
                        c6 = _nib(words, 6)
                        c7 = _nib(words, 7)
                    if GROUPED:
                        pa = tl.zeros([BN, BM], dtype=tl.int32)
                        pa = _dot8(pa, c0, xq_ptr, kb + 0, rm, mmask, K, r32, F32DOT)
                        pa = _dot8(pa, c1, xq_ptr, kb + 32, rm, mmask, K, r32, F32DOT)
                        pa = _dot8(pa, c2, xq_ptr, kb + 64, rm, mmask, K, r32, F32DOT)
                        pa = _dot8(pa, c3, xq_ptr, kb + 96, rm, mmask, K, r32, F32DOT)
                        pb = tl.zeros([BN, BM], dtype=tl.int32)
                        pb = _dot8(pb, c4, xq_ptr, kb + 128, rm, mmask, K, r32, F32DOT)
                        pb = _dot8(pb, c5, xq_ptr, kb + 160, rm, mmask, K, r32, F32DOT)
                        pb = _dot8(pb, c6, xq_ptr, kb + 192, rm, mmask, K, r32, F32DOT)
                        pb = _dot8(pb, c7, xq_ptr, kb + 224, rm, mmask, K, r32, F32DOT)
                        ga = tl.load(gs_ptr + rnl * NGS + kb // 128)[:, None]
                        gb = tl.load(gs_ptr + rnl * NGS + kb // 128 + 1)[:, None]
                        if USE_ASM:   # partials are 16x: divide exactly before scaling
                            pa = pa >> 4
                            pb = pb >> 4
                        acc += pa * ga + pb * gb
                    else:
                        acc = _dot8(acc, c0, xq_ptr, kb + 0, rm, mmask, K, r32, F32DOT)
                        acc = _dot8(acc, c1, xq_ptr, kb + 32, rm, mmask, K, r32, F32DOT)
                        acc = _dot8(acc, c2, xq_ptr, kb + 64, rm, mmask, K, r32, F32DOT)
                        acc = _dot8(acc, c3, xq_ptr, kb + 96, rm, mmask, K, r32, F32DOT)
                        acc = _dot8(acc, c4, xq_ptr, kb + 128, rm, mmask, K, r32, F32DOT)
                        acc = _dot8(acc, c5, xq_ptr, kb + 160, rm, mmask, K, r32, F32DOT)
                        acc = _dot8(acc, c6, xq_ptr, kb + 192, rm, mmask, K, r32, F32DOT)
                        acc = _dot8(acc, c7, xq_ptr, kb + 224, rm, mmask, K, r32, F32DOT)
        else:
            rk = tl.arange(0, 128)
            wp = w_ptr + rnl[:, None] * K + rk[None, :]                          # [BN, 128] int8
            for k0 in range(0, K, 128 * R):
                for r in tl.static_range(R):
                    kb = k0 + 128 * r
                    acc = _dot8(acc, tl.load(wp + kb), xq_ptr, kb, rm, mmask, K, rk, F32DOT)
        sw = tl.load(sw_ptr + rnl)
        if W4 and USE_ASM and not GROUPED:
            sw = sw * 0.0625
        sx = tl.load(sx_ptr + rm, mask=mmask, other=0.0)
        out = acc.to(tl.float32) * sw[:, None] * sx[None, :]
        ptr = y_ptr + rm[None, :] * sym + rn[:, None]
        tl.store(ptr, out.to(y_ptr.dtype.element_ty), mask=(rn < N)[:, None] & mmask[None, :])
