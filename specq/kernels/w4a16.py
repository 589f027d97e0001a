"""W4A16 (int4 weights, bf16/fp16 activations): a GEMV for one token and a tensor-core dequantize-GEMM
(y^T = W @ x^T, so the weight tile is the wide operand and M is padded only to 16) for 2..128 tokens.

Weights are repacked once (prepare_w4a16) from the canonical layout into 128-k blocks where nibble j of
16 adjacent words is one contiguous 16-k slice: the 8 slices of a block are 8 tl.dot operands, and two
words are dequantized at a time with packed half2 PTX (prmt + lop3 + 2 fma per pair of values).
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from ..errors import SpecqError
from .common import HAS_TRITON, INTERPRET, interleave_int4, tl, triton, use_asm, use_triton
from .ref import dequant_w4

if HAS_TRITON:
    from .common import dq8_asm


class W4A16Weight(NamedTuple):
    qweight: torch.Tensor   # int32 [N, K//8], 16-word interleaved blocks of 128 k
    scales: torch.Tensor    # [N, K//G] activation dtype
    nzeros: torch.Tensor    # [N, K//G] activation dtype: -(MAGIC + zero), MAGIC = 128 (bf16) / 1024 (fp16)
    group_size: int
    N: int
    K: int
    raw: tuple              # canonical (qweight, scales, zeros) kept for the fallback path


def _magic(dtype) -> float:
    return 1024.0 if dtype == torch.float16 else 128.0


def prepare_w4a16(qweight, scales, zeros, group_size=None, dtype=None) -> W4A16Weight:
    """One-time repack of canonical int4 weights for w4a16_linear (dtype: activation dtype)."""
    N, W = qweight.shape
    K = W * 8
    G = K if group_size in (None, -1, 0) else int(group_size)
    if qweight.dtype != torch.int32 or scales.shape != (N, K // G) or zeros.shape != scales.shape or K % G:
        raise SpecqError(f"bad W4A16 tensors: qweight {tuple(qweight.shape)} {qweight.dtype}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group_size {group_size}")
    dtype = dtype or scales.dtype
    ok = K % 128 == 0 and G % 128 == 0
    packed = interleave_int4(qweight, 16) if ok else qweight
    s = scales.to(dtype).contiguous()
    nz = (-(zeros.float() + _magic(dtype))).to(dtype).contiguous()   # exact: integer zeros < 128
    return W4A16Weight(packed, s, nz, G if ok else -1, N, K, (qweight, scales, zeros))


_CACHE: dict = {}


def _prepared(qweight, scales, zeros, group_size, dtype) -> W4A16Weight:
    """prepare_w4a16 cached per qweight tensor (dropped when it dies or changes in place)."""
    key = (id(qweight), dtype)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == qweight._version and hit[2].raw[1] is scales:
        return hit[2]
    p = prepare_w4a16(qweight, scales, zeros, group_size, dtype)
    _CACHE[key] = (weakref.ref(qweight, lambda _, k=key: _CACHE and _CACHE.pop(k, None)), qweight._version, p)
    return p


# (kind, BM, BN, R, num_warps, num_stages): kind "gemv" or "dot"; R 128-k blocks per loop step.
# Picked from the H100 sweep of bench/kernels.py --sweep (Llama-3-8B shapes; "wide" = gate_up-like N).
def default_config(M: int, N: int, K: int):
    wide = N >= 8192
    if M == 1:
        return ("gemv", 1, 32 if wide else 16, 4, 4, 3)
    if M <= 16:
        return ("dot", 16, 64 if wide else 32, 2, 4, 3)
    if M <= 32:
        return ("dot", 32, 128, 1, 8, 3) if wide else ("dot", 32, 32, 2, 4, 3)
    if M <= 64:
        return ("dot", 64, 128, 1, 8, 3) if wide else ("dot", 32, 64, 2, 4, 3)
    return ("dot", 64, 128, 1, 8, 3) if wide else ("dot", 64, 64, 2, 4, 3)


def w4a16_linear(x, qweight, scales=None, zeros=None, group_size=None, cfg=None, asm=None):
    """y [..., N] = x [..., K] @ W^T. qweight is either a W4A16Weight (from prepare_w4a16) or the
    canonical int32 [N, K//8] tensor with scales / zeros [N, K//G] (repacked once and cached)."""
    w = qweight if isinstance(qweight, W4A16Weight) else _prepared(qweight, scales, zeros, group_size, x.dtype)
    if x.shape[-1] != w.K:
        raise SpecqError(f"w4a16_linear: x has K={x.shape[-1]}, weight has K={w.K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.K)
    if x2.dtype != w.scales.dtype:
        x2 = x2.to(w.scales.dtype)
    if w.group_size < 0 or not use_triton(x2) or x2.shape[0] == 0:
        q, s, z = w.raw
        y = x2 @ dequant_w4(q, s, z).to(x2.dtype).T
        return y.to(x.dtype).reshape(*lead, w.N)
    y = _launch(x2.contiguous(), w, cfg, use_asm(x2) if asm is None else asm)
    return y.to(x.dtype).reshape(*lead, w.N)


def _launch(x, w: W4A16Weight, cfg, asm):
    M, K = x.shape
    N = w.N
    kind, BM, BN, R, nw, ns = cfg or default_config(M, N, K)
    while K % (128 * R):
        R //= 2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    gemv = kind == "gemv"
    grid = (M if gemv else triton.cdiv(M, BM), triton.cdiv(N, BN))
    _w4a16_kernel[grid](x, w.qweight, w.scales, w.nzeros, y, M, N, K, w.group_size, K // w.group_size,
                        x.stride(0), y.stride(0), _magic(x.dtype),
                        BM=BM if not gemv else 16, BN=BN, R=R, GEMV=gemv, USE_ASM=asm,
                        FP16=x.dtype == torch.float16, F32DOT=INTERPRET, num_warps=nw, num_stages=ns)
    return y


if HAS_TRITON:
    @triton.jit
    def _dq(words, j: tl.constexpr, s, zneg):
        """Plain path: nibble j of every word, (q - z) * s in float32."""
        q = ((words >> (4 * j)) & 0xF).to(tl.float32)
        return (q + zneg) * s

    @triton.jit
    def _acc(acc, w, xrow, k, rm, mmask, sxm, rw, GEMV: tl.constexpr, F32DOT: tl.constexpr):
        """acc += one 16-k slice: w [BN, 16] against x[:, k:k+16]."""
        if GEMV:
            xv = tl.load(xrow + k + rw).to(tl.float32)                       # [16]
            return acc + w.to(tl.float32) * xv[None, :]
        else:
            xt = tl.load(xrow + rm[None, :] * sxm + (k + rw)[:, None], mask=mmask[None, :], other=0.0)
            if F32DOT:  # the interpreter's bf16 dot is wrong: do it in fp32 there
                return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
            return tl.dot(w.to(xt.dtype), xt, acc)                            # [BN,16] @ [16,BM]

    @triton.jit(do_not_specialize=["M"])
    def _w4a16_kernel(x_ptr, w_ptr, s_ptr, nz_ptr, y_ptr, M, N, K, G, NG, sxm, sym, MAGIC,
                      BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr, GEMV: tl.constexpr,
                      USE_ASM: tl.constexpr, FP16: tl.constexpr, F32DOT: tl.constexpr):
        pid_m = tl.program_id(0)          # m fastest: programs sharing a weight tile run together
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rnl = rn % N                      # in-bounds rows for loads; stores are masked
        rw = tl.arange(0, 16)
        if GEMV:
            rm = pid_m + tl.arange(0, 1)
            xrow = x_ptr + pid_m * sxm
            acc = tl.zeros([BN, 16], dtype=tl.float32)
        else:
            rm = pid_m * BM + tl.arange(0, BM)
            xrow = x_ptr
            acc = tl.zeros([BN, BM], dtype=tl.float32)
        mmask = rm < M
        wp = w_ptr + rnl[:, None] * (K // 8) + rw[None, :]                    # [BN, 16] words
        for k0 in range(0, K, 128 * R):
            for r in tl.static_range(R):                  # R 128-k blocks per loop step
                kb = k0 + 128 * r
                words = tl.load(wp + kb // 8)
                g = kb // G
                s = tl.load(s_ptr + rnl * NG + g)[:, None]                    # [BN, 1]
                nz = tl.load(nz_ptr + rnl * NG + g)[:, None]
                if USE_ASM:
                    w0, w1, w2, w3, w4, w5, w6, w7 = dq8_asm(words, s, nz, FP16)
                else:
                    sf = s.to(tl.float32)
                    zf = nz.to(tl.float32) + MAGIC                           # = -zero
                    w0 = _dq(words, 0, sf, zf)
                    w1 = _dq(words, 1, sf, zf)
                    w2 = _dq(words, 2, sf, zf)
                    w3 = _dq(words, 3, sf, zf)
                    w4 = _dq(words, 4, sf, zf)
                    w5 = _dq(words, 5, sf, zf)
                    w6 = _dq(words, 6, sf, zf)
                    w7 = _dq(words, 7, sf, zf)
                acc = _acc(acc, w0, xrow, kb + 0, rm, mmask, sxm, rw, GEMV, F32DOT)
                acc = _acc(acc, w1, xrow, kb + 16, rm, mmask, sxm, rw, GEMV, F32DOT)
                acc = _acc(acc, w2, xrow, kb + 32, rm, mmask, sxm, rw, GEMV, F32DOT)
                acc = _acc(acc, w3, xrow, kb + 48, rm, mmask, sxm, rw, GEMV, F32DOT)
                acc = _acc(acc, w4, xrow, kb + 64, rm, mmask, sxm, rw, GEMV, F32DOT)
                acc = _acc(acc, w5, xrow, kb + 80, rm, mmask, sxm, rw, GEMV, F32DOT)
                acc = _acc(acc, w6, xrow, kb + 96, rm, mmask, sxm, rw, GEMV, F32DOT)
                acc = _acc(acc, w7, xrow, kb + 112, rm, mmask, sxm, rw, GEMV, F32DOT)
        if GEMV:
            out = tl.sum(acc, axis=1)
            tl.store(y_ptr + pid_m * sym + rn, out.to(y_ptr.dtype.element_ty), mask=rn < N)
        else:
            ptr = y_ptr + rm[None, :] * sym + rn[:, None]
            tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=(rn < N)[:, None] & mmask[None, :])
