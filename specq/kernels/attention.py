"""Decode attention on CUDA: one query token, grouped-query heads, split over the static cache (flash-decoding).

    y [H, hd] = softmax(q K^T / sqrt(hd) masked) V      q [H, hd]; K, V [Hkv, S, hd]; mask [S] bool

torch's SDPA runs this shape (1 token, a boolean mask over the whole static cache) with kernels tiled for 64+
queries: 9-14 us per layer at Llama-3-8B shapes on the H100. Here, kernel 1 gives each (KV head, slice of the
cache) one program: the rep query heads of that KV head are the rows of one [16, hd] tile, blocks of keys
that the mask leaves out entirely are skipped, and an online softmax over the slice writes an fp32 partial
(output, max, sum). Kernel 2 merges the slices per head. Under torch.compile it is one opaque op
(torch.ops.specq.decode_attn). decode_attention_ref is the plain-torch reference.
"""
from __future__ import annotations

import math

import torch

from .common import HAS_TRITON, INTERPRET, tl, triton

BLOCK = 64                  # keys per step
# a masked score is -1e30, not -inf: an all-masked slice then keeps max -1e30, sum 0 and output 0 (no NaN)


def decode_attention_ref(q, K, V, mask):
    """Reference: q [H, hd], K/V [Hkv, S, hd], mask [S] bool -> [H, hd] (float32 math, q's dtype)."""
    H, hd = q.shape
    rep = H // K.shape[0]
    Kr = K.float().repeat_interleave(rep, 0)
    Vr = V.float().repeat_interleave(rep, 0)
    s = torch.einsum("hd,hsd->hs", q.float(), Kr) / math.sqrt(hd)
    s = s.masked_fill(~mask[None, :], float("-inf"))
    return torch.einsum("hs,hsd->hd", s.softmax(-1), Vr).to(q.dtype)


def usable(q, K, mask) -> bool:
    """The kernel takes 16-bit q/K/V, power-of-two head dims 16..256, <= 16 query heads per KV head (CUDA, or
    CPU tensors under TRITON_INTERPRET=1)."""
    H, hd = q.shape
    return (HAS_TRITON and (q.is_cuda or INTERPRET) and q.dtype in (torch.float16, torch.bfloat16)
            and K.dtype == q.dtype and hd in (16, 32, 64, 128, 256) and H % K.shape[0] == 0 and H // K.shape[0] <= 16
            and mask.dtype == torch.bool)


def decode_attention(q, K, V, mask):
    """q [H, hd], K/V [Hkv, S, hd] (contiguous), mask [S] bool -> [H, hd]."""
    if torch.compiler.is_compiling():
        return torch.ops.specq.decode_attn(q, K, V, mask)
    return _run(q, K, V, mask)


def _run(q, K, V, mask):
    H, hd = q.shape
    Hkv, S, _ = K.shape
    rep = H // Hkv
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    per = max(BLOCK, -(-S // max(1, (2 * sms) // Hkv)))
    per = -(-per // BLOCK) * BLOCK                       # keys per slice, whole blocks
    nsp = -(-S // per)
    o = torch.empty(Hkv, nsp, rep, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(Hkv, nsp, rep, 2, dtype=torch.float32, device=q.device)
    y = torch.empty(H, hd, dtype=q.dtype, device=q.device)
    q, K, V = q.contiguous(), K.contiguous(), V.contiguous()
    m8 = mask.contiguous().view(torch.uint8)
    _split_kernel[(Hkv, nsp)](q, K, V, m8, o, ml, S, per, 1.0 / math.sqrt(hd), REP=rep, HD=hd, BLOCK=BLOCK,
                              F32DOT=INTERPRET, num_warps=4)
    _merge_kernel[(Hkv,)](o, ml, y, nsp, REP=rep, HD=hd, NSPP=max(2, triton.next_power_of_2(nsp)), num_warps=4)
    return y


if HAS_TRITON:
    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, ml_ptr, S, PER, scale, REP: tl.constexpr,
                      HD: tl.constexpr, BLOCK: tl.constexpr, F32DOT: tl.constexpr):
        h = tl.program_id(0)                 # KV head
        sp = tl.program_id(1)                # slice of the cache: keys [sp * PER, sp * PER + PER)
        nsp = tl.num_programs(1)
        rr = tl.arange(0, 16)                # query rows: the REP heads of this KV head, padded to 16
        rd = tl.arange(0, HD)
        qm = rr < REP
        q = tl.load(q_ptr + (h * REP + rr)[:, None] * HD + rd[None, :], mask=qm[:, None], other=0.0)   # [16, HD]
        m_i = tl.full([16], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([16], dtype=tl.float32)
        acc = tl.zeros([16, HD], dtype=tl.float32)
        end = tl.minimum(sp * PER + PER, S)
        for s0 in range(sp * PER, end, BLOCK):
            rs = s0 + tl.arange(0, BLOCK)
            inb = rs < end
            valid = (tl.load(mask_ptr + rs, mask=inb, other=0) != 0) & inb
            if tl.max(valid.to(tl.int32), axis=0) > 0:      # blocks the mask leaves out: no K/V reads
                kv = (h * S + rs)[:, None] * HD + rd[None, :]
                k = tl.load(k_ptr + kv, mask=inb[:, None], other=0.0)                         # [BLOCK, HD]
                if F32DOT:   # the interpreter's 16-bit dot is wrong: fp32 there
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale                                       # [16, BLOCK]
                s = tl.where(valid[None, :], s, -1.0e30)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.where(valid[None, :], tl.exp(s - m_new[:, None]), 0.0)
                alpha = tl.exp(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_ptr + kv, mask=inb[:, None], other=0.0)
                if F32DOT:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        row = (h * nsp + sp) * REP + rr
        tl.store(o_ptr + row[:, None] * HD + rd[None, :], acc, mask=qm[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=qm)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=qm)

    @triton.jit
    def _merge_kernel(o_ptr, ml_ptr, y_ptr, NSP, REP: tl.constexpr, HD: tl.constexpr, NSPP: tl.constexpr):
        h = tl.program_id(0)
        rs = tl.arange(0, NSPP)
        rd = tl.arange(0, HD)
        sm = rs < NSP
        for r in tl.static_range(REP):
            row = (h * NSP + rs) * REP + r                                                   # [NSPP]
            m = tl.load(ml_ptr + row * 2, mask=sm, other=-1.0e30)
            l_ = tl.load(ml_ptr + row * 2 + 1, mask=sm, other=0.0)
            w = tl.where(sm, tl.exp(m - tl.max(m, axis=0)), 0.0)
            o = tl.load(o_ptr + row[:, None] * HD + rd[None, :], mask=sm[:, None], other=0.0)   # [NSPP, HD]
            yv = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l_, axis=0)
            tl.store(y_ptr + (h * REP + r) * HD + rd, yv.to(y_ptr.dtype.element_ty))


@torch.library.custom_op("specq::decode_attn", mutates_args=())
def _decode_attn_op(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _run(q, K, V, mask)


@_decode_attn_op.register_fake
def _(q, K, V, mask):
    return torch.empty_like(q)
