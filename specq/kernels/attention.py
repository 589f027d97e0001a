"""Attention over the static cache on CUDA for few query tokens (decode and speculative verification),
grouped-query heads, split over the cache (flash-decoding).

    y [H, M, hd] = softmax(q K^T / sqrt(hd) masked) V      q [H, M, hd]; K, V [Hkv, S, hd]; mask [M, S] bool

torch's SDPA runs these shapes (1..64 tokens, a boolean mask over the whole static cache) with kernels tiled for
many queries, plus a mask conversion: 9-14 us per layer at Llama-3-8B shapes on the H100 for one token. Here the
rep query heads of a KV head times the M tokens are the ROWS = rep * M rows of that head (row i: query head
i // M of the group, token i % M, the layout of q [H, M, hd]), tiled BR rows at a time. Kernel 1 gives each
(KV head, row tile, slice of the cache) one program: blocks of keys that the mask leaves out for every row of the
tile are skipped (the unused end of the static cache), and an online softmax over the slice writes an fp32
partial (output, max, sum). Kernel 2 merges the slices per row. Under torch.compile it is one opaque op
(torch.ops.specq.attn). attention_ref is the plain-torch reference.
"""
from __future__ import annotations

import math

import torch

from .common import HAS_TRITON, INTERPRET, pdl_launch, tl, triton

BLOCK = 64                  # keys per step
MAX_ROWS = 512              # rep * M rows per KV head the kernel takes (more: SDPA)
# a masked score is -1e30, not -inf: an all-masked slice then keeps max -1e30, sum 0 and output 0 (no NaN)


def attention_ref(q, K, V, mask):
    """Reference: q [H, M, hd], K/V [Hkv, S, hd], mask [M, S] bool -> [H, M, hd] (float32 math, q's dtype)."""
    H, M, hd = q.shape
    rep = H // K.shape[0]
    Kr = K.float().repeat_interleave(rep, 0)
    Vr = V.float().repeat_interleave(rep, 0)
    s = torch.einsum("hmd,hsd->hms", q.float(), Kr) / math.sqrt(hd)
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hms,hsd->hmd", s.softmax(-1), Vr).to(q.dtype)


def decode_attention_ref(q, K, V, mask):
    """One token: q [H, hd], mask [S] -> [H, hd]."""
    return attention_ref(q[:, None], K, V, mask[None])[:, 0]


def usable(q, K, mask) -> bool:
    """q [H, M, hd]: 16-bit q/K/V, power-of-two head dims 16..256, H a multiple of Hkv, rep * M <= MAX_ROWS,
    a bool mask [M, S] (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    H, M, hd = q.shape
    return (HAS_TRITON and (q.is_cuda or INTERPRET) and q.dtype in (torch.float16, torch.bfloat16)
            and K.dtype == q.dtype and hd in (16, 32, 64, 128, 256) and H % K.shape[0] == 0
            and (H // K.shape[0]) * M <= MAX_ROWS and mask.dtype == torch.bool and mask.shape == (M, K.shape[1]))


def attention(q, K, V, mask):
    """q [H, M, hd], K/V [Hkv, S, hd] (contiguous), mask [M, S] bool -> [H, M, hd]."""
    if torch.compiler.is_compiling():
        return torch.ops.specq.attn(q, K, V, mask)
    return _run(q, K, V, mask)


def decode_attention(q, K, V, mask):
    """One token: q [H, hd], mask [S] bool -> [H, hd]."""
    return attention(q[:, None], K, V, mask[None])[:, 0]


def _run(q, K, V, mask):
    H, M, hd = q.shape
    Hkv, S, _ = K.shape
    rows = (H // Hkv) * M
    BR = 16 if rows <= 16 else 32 if rows <= 32 else 64
    nrt = -(-rows // BR)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    per = max(BLOCK, -(-S // max(1, (2 * sms) // (Hkv * nrt))))
    per = -(-per // BLOCK) * BLOCK                       # keys per slice, whole blocks
    nsp = -(-S // per)
    o = torch.empty(Hkv, nsp, rows, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(Hkv, nsp, rows, 2, dtype=torch.float32, device=q.device)
    y = torch.empty(H, M, hd, dtype=q.dtype, device=q.device)
    q, K, V = q.contiguous(), K.contiguous(), V.contiguous()
    m8 = mask.contiguous().view(torch.uint8)
    P, kw = pdl_launch(q.device)
    _split_kernel[(Hkv, nrt, nsp)](q, K, V, m8, o, ml, S, per, M, rows, 1.0 / math.sqrt(hd), HD=hd, BR=BR,
                                   BLOCK=BLOCK, ONE=M == 1, F32DOT=INTERPRET, PDL=P, num_warps=4, **kw)
    _merge_kernel[(Hkv, rows)](o, ml, y, nsp, rows, HD=hd, NSPP=max(2, triton.next_power_of_2(nsp)), PDL=P,
                               num_warps=4, **kw)
    return y


if HAS_TRITON:
    from .common import pdl_enter

    @triton.jit
    def online_step(q, k, v, valid, m_i, l_i, acc, scale, F32DOT: tl.constexpr):
        """One key block of the online softmax: q [BR, HD], k / v [BLOCK, HD], valid [BR, BLOCK] bool; running max
        m_i [BR], sum l_i [BR], output acc [BR, HD] (fp32) -> the updated (m_i, l_i, acc)."""
        if F32DOT:   # the interpreter's 16-bit dot is wrong: fp32 there
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale                                                   # [BR, BLOCK]
        s = tl.where(valid, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.where(valid, tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if F32DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["S", "PER", "M", "ROWS"])   # no recompile per cache size / tokens
    def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, ml_ptr, S, PER, M, ROWS, scale, HD: tl.constexpr,
                      BR: tl.constexpr, BLOCK: tl.constexpr, ONE: tl.constexpr, F32DOT: tl.constexpr,
                      PDL: tl.constexpr):
        pdl_enter(PDL)
        h = tl.program_id(0)                 # KV head
        rt = tl.program_id(1)                # row tile
        sp = tl.program_id(2)                # slice of the cache: keys [sp * PER, sp * PER + PER)
        nsp = tl.num_programs(2)
        rr = rt * BR + tl.arange(0, BR)      # rows: query head rr // M of the group, token rr % M
        rd = tl.arange(0, HD)
        qm = rr < ROWS
        q = tl.load(q_ptr + (h * ROWS + rr)[:, None] * HD + rd[None, :], mask=qm[:, None], other=0.0)  # [BR, HD]
        tok = rr % M
        m_i = tl.full([BR], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BR], dtype=tl.float32)
        acc = tl.zeros([BR, HD], dtype=tl.float32)
        end = tl.minimum(sp * PER + PER, S)
        for s0 in range(sp * PER, end, BLOCK):
            rs = s0 + tl.arange(0, BLOCK)
            inb = rs < end
            if ONE:                          # one token: one mask row for every row of the tile
                valid = ((tl.load(mask_ptr + rs, mask=inb, other=0) != 0) & inb)[None, :] & qm[:, None]
            else:
                valid = tl.load(mask_ptr + tok[:, None] * S + rs[None, :], mask=qm[:, None] & inb[None, :],
                                other=0) != 0                                                  # [BR, BLOCK]
            if tl.max(tl.max(valid.to(tl.int32), axis=1), axis=0) > 0:    # blocks the mask leaves out: no K/V reads
                kv = (h * S + rs)[:, None] * HD + rd[None, :]
                k = tl.load(k_ptr + kv, mask=inb[:, None], other=0.0)                         # [BLOCK, HD]
                v = tl.load(v_ptr + kv, mask=inb[:, None], other=0.0)
                m_i, l_i, acc = online_step(q, k, v, valid, m_i, l_i, acc, scale, F32DOT)
        row = (h * nsp + sp) * ROWS + rr
        tl.store(o_ptr + row[:, None] * HD + rd[None, :], acc, mask=qm[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=qm)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=qm)

    @triton.jit(do_not_specialize=["NSP", "ROWS"])
    def _merge_kernel(o_ptr, ml_ptr, y_ptr, NSP, ROWS, HD: tl.constexpr, NSPP: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)
        h = tl.program_id(0)
        r = tl.program_id(1)
        rs = tl.arange(0, NSPP)
        rd = tl.arange(0, HD)
        sm = rs < NSP
        row = (h * NSP + rs) * ROWS + r                                                      # [NSPP]
        m = tl.load(ml_ptr + row * 2, mask=sm, other=-1.0e30)
        l_ = tl.load(ml_ptr + row * 2 + 1, mask=sm, other=0.0)
        w = tl.where(sm, tl.exp(m - tl.max(m, axis=0)), 0.0)
        o = tl.load(o_ptr + row[:, None] * HD + rd[None, :], mask=sm[:, None], other=0.0)       # [NSPP, HD]
        yv = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l_, axis=0)
        tl.store(y_ptr + (h * ROWS + r) * HD + rd, yv.to(y_ptr.dtype.element_ty))


@torch.library.custom_op("specq::attn", mutates_args=())
def _attn_op(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _run(q, K, V, mask)


@_attn_op.register_fake
def _(q, K, V, mask):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
