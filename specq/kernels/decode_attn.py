"""One-token decode attention in two launches: rope of q and k, the KV-cache write and split-cache attention in
one kernel, the merge of the splits in a second (CUDA; the decode step of a KVCache model).

    y [1, H * hd] = softmax(rope(q) K^T / sqrt(hd) masked) V,   kc[:, slot] = rope(k),  vc[:, slot] = v
    qkv [1, (H + 2 Hkv) hd] (qkv_proj's output); cos, sin [1, hd]; slots [1]; kc, vc [Hkv, S, hd]; mask [1, S] bool

At one token the decode step ran three launches per layer for this (specq.kernels.rope, then attention.py's split
and merge kernels): 11.7 us per layer at 128 keys and 12.9 at 512 in CUDA-graph replays, Llama-3-8B heads on the
H100, against 6.3 and 7.1 here (bench/dev/decode_attn_ab.py; bench/results/h100/decode_variants.txt). The split
kernel has program (KV head h, slice sp):
  1. ropes the rep query rows of KV head h (the rope kernel's fp32 math and rounding);
  2. the program whose slice holds the token's own slot also ropes k and writes k and v into the cache, then a CTA
     barrier (its key loads go to L2, .cg, so they see the write);
  3. online softmax over its slice of the keys [0, slot]: the slices split slot + 1 keys, not the whole static
     cache, so every program reads only live keys (CONTRACT: a decode token attends to no cache slot beyond its
     own; specq writes a token's context and ancestors at lower slots, and the mask still applies inside);
  4. one slice in all (slot < BLOCK): program 0 writes y; else every program writes an fp32 partial (output, max,
     sum) and the merge kernel, one program per query head, combines them (attention.py's merge math).
A merge inside the split kernel (the last program of a head to count itself on an atomic merges) measured slower:
7.8 against 6.3 us at 128 keys, the atomic round trip and the serial merge on one program (same script). So did an
L2 bulk prefetch of o_proj's weights from this kernel (cp.async.bulk.prefetch.L2): o_proj got 1.2 us faster per
layer but the kernel waits for its prefetches, 2 us longer (decode step 456.0 against 459.8 tok/s, removed).
decode_attention_ref is the plain-torch reference (rope_cache_ref + attention_ref).
"""
from __future__ import annotations

import math
import os

import torch

from .attention import attention_ref
from .common import HAS_TRITON, INTERPRET, pdl_launch, tl, triton
from .rope import rope_cache_ref

BLOCK = 64             # keys per step; a slice is whole blocks
STAGES = 2             # software-pipelined key blocks per program
WARPS = (8, 1)         # warps of the split and the merge programs (H100, bench/dev/decode_attn_ab.py: split on 8 warps
                       # -0.2..-0.5 us per layer; merge on 1 warp -0.2..-0.4; blocks of 128 or 256 keys slower)
NO_DECODE = os.environ.get("SPECQ_NO_DECODE_ATTN", "0") == "1"      # A/B switch: rope + split + merge kernels


def decode_attention_ref(qkv, cos, sin, slots, kc, vc, mask, nh: int, nkv: int) -> torch.Tensor:
    """Reference: writes the cache at slots, returns attention(rope(q)) as [1, H * hd]."""
    q = rope_cache_ref(qkv, cos, sin, slots, kc, vc, nh, nkv)              # [H, 1, hd]
    y = attention_ref(q, kc.to(q.dtype), vc.to(q.dtype), mask)             # [H, 1, hd]
    return y.transpose(0, 1).reshape(1, -1)


def usable(qkv, kc, vc, mask) -> bool:
    """One token, 16-bit qkv and cache of one dtype, contiguous cache, power-of-two head dims 16..256, rep query heads
    per KV head <= 64 (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    Hkv, S, hd = kc.shape
    nh = qkv.shape[-1] // hd - 2 * Hkv
    return (HAS_TRITON and not NO_DECODE and (qkv.is_cuda or INTERPRET) and qkv.dim() == 2 and qkv.shape[0] == 1
            and qkv.dtype in (torch.float16, torch.bfloat16) and kc.dtype == qkv.dtype and vc.dtype == qkv.dtype
            and kc.is_contiguous() and vc.is_contiguous() and hd in (16, 32, 64, 128, 256) and nh > 0
            and nh % Hkv == 0 and nh // Hkv <= 64 and mask.dtype == torch.bool and tuple(mask.shape) == (1, S))


def decode_attention(qkv, cos, sin, slots, kc, vc, mask, nh: int, nkv: int) -> torch.Tensor:
    """The kernels (usable() said they can)."""
    if torch.compiler.is_compiling():
        return torch.ops.specq.decode_attn(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)
    return _run(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)


def _nsp(Hkv: int, device) -> int:
    """Slices per KV head: a power of two (the merge's tile), about two programs per SM, at most 64."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    n = 1
    while 2 * n * Hkv <= 2 * sms and n < 64:
        n *= 2
    return n


def _run(qkv, cos, sin, slots, kc, vc, mask, nh, nkv):
    Hkv, S, hd = kc.shape
    rep = nh // Hkv
    BR = max(16, triton.next_power_of_2(rep))
    nsp = _nsp(Hkv, qkv.device)
    o = torch.empty(Hkv, nsp, BR, hd, dtype=torch.float32, device=qkv.device)
    ml = torch.empty(Hkv, nsp, BR, 2, dtype=torch.float32, device=qkv.device)
    y = torch.empty(1, nh * hd, dtype=qkv.dtype, device=qkv.device)
    qkv, cos, sin, slots = qkv.contiguous(), cos.contiguous(), sin.contiguous(), slots.contiguous()
    m8 = mask.contiguous().view(torch.uint8)
    P, kw = pdl_launch(qkv.device)
    _split_kernel[(Hkv, nsp)](qkv, cos, sin, slots, kc, vc, m8, o, ml, y, S, nh, nkv, 1.0 / math.sqrt(hd),
                              REP=rep, HD=hd, BR=BR, BLOCK=BLOCK, NSP=nsp, STAGES=STAGES, F32DOT=INTERPRET,
                              PDL=P, num_warps=WARPS[0], **kw)
    _merge_kernel[(Hkv, rep)](slots, o, ml, y, REP=rep, HD=hd, BR=BR, NSP=nsp, BLOCK=BLOCK, PDL=P,
                              num_warps=WARPS[1], **kw)
    return y


if HAS_TRITON:
    from .attention import online_step
    from .common import pdl_enter

    @triton.jit(do_not_specialize=["S"])     # S: the cache size, one per prompt (no recompile)
    def _split_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, mask_ptr, o_ptr, ml_ptr, y_ptr,
                      S, NH, NKV, scale, REP: tl.constexpr, HD: tl.constexpr, BR: tl.constexpr,
                      BLOCK: tl.constexpr, NSP: tl.constexpr, STAGES: tl.constexpr, F32DOT: tl.constexpr,
                      PDL: tl.constexpr):
        pdl_enter(PDL)
        h = tl.program_id(0)                 # KV head
        sp = tl.program_id(1)                # slice
        H2: tl.constexpr = HD // 2
        rd = tl.arange(0, HD)
        rp = (rd + H2) % HD                  # rotate-half partner
        first = rd < H2
        rr = tl.arange(0, BR)                # rows: query heads h * REP + rr
        qm = rr < REP
        slot = tl.load(slot_ptr).to(tl.int32)
        per = tl.cdiv(tl.cdiv(slot + 1, NSP), BLOCK) * BLOCK     # keys per slice, whole blocks
        start = sp * per
        end = tl.minimum(start + per, slot + 1)
        c = tl.load(cos_ptr + rd).to(tl.float32)
        s = tl.load(sin_ptr + rd).to(tl.float32)
        # 1. q rows, roped as specq.kernels.rope does: first half x*c + (-x')*s, second half x*c + x'*s
        qrow = qkv_ptr + (h * REP + rr)[:, None] * HD
        x = tl.load(qrow + rd[None, :], mask=qm[:, None], other=0.0).to(tl.float32)
        xp = tl.load(qrow + rp[None, :], mask=qm[:, None], other=0.0).to(tl.float32)
        xp = tl.where(first[None, :], -xp, xp)
        q = (x * c[None, :] + xp * s[None, :]).to(qkv_ptr.dtype.element_ty)                 # [BR, HD]
        # 2. the token's own k / v into the cache (the program whose slice holds the slot)
        if (slot >= start) & (slot < end):
            krow = qkv_ptr + (NH + h) * HD
            kx = tl.load(krow + rd).to(tl.float32)
            kp = tl.load(krow + rp).to(tl.float32)
            kp = tl.where(first, -kp, kp)
            tl.store(kc_ptr + (h * S + slot) * HD + rd, (kx * c + kp * s).to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + (h * S + slot) * HD + rd, tl.load(qkv_ptr + (NH + NKV + h) * HD + rd))
            tl.debug_barrier()
        # 3. online softmax over the slice (attention.py's split kernel, one mask row)
        m_i = tl.full([BR], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BR], dtype=tl.float32)
        acc = tl.zeros([BR, HD], dtype=tl.float32)
        for s0 in tl.range(start, end, BLOCK, num_stages=STAGES):
            rs = s0 + tl.arange(0, BLOCK)    # keys; mask, K and V loads issued together (live keys: no skip test)
            inb = rs < end
            valid = ((tl.load(mask_ptr + rs, mask=inb, other=0) != 0) & inb)[None, :] & qm[:, None]
            kv = (h * S + rs)[:, None] * HD + rd[None, :]
            k = tl.load(kc_ptr + kv, mask=inb[:, None], other=0.0, cache_modifier=".cg")          # [BLOCK, HD]
            v = tl.load(vc_ptr + kv, mask=inb[:, None], other=0.0, cache_modifier=".cg")
            m_i, l_i, acc = online_step(q, k, v, valid, m_i, l_i, acc, scale, F32DOT)
        # 4. one slice in all: program 0 has the answer; else partials (slices past the live keys: empty ones)
        if tl.cdiv(slot + 1, per) == 1:
            if sp == 0:
                tl.store(y_ptr + (h * REP + rr)[:, None] * HD + rd[None, :],
                         (acc / l_i[:, None]).to(y_ptr.dtype.element_ty), mask=qm[:, None])
        else:
            row = (h * NSP + sp) * BR + rr
            tl.store(o_ptr + row[:, None] * HD + rd[None, :], acc, mask=qm[:, None])
            tl.store(ml_ptr + row * 2, m_i, mask=qm)
            tl.store(ml_ptr + row * 2 + 1, l_i, mask=qm)

    @triton.jit
    def _merge_kernel(slot_ptr, o_ptr, ml_ptr, y_ptr, REP: tl.constexpr, HD: tl.constexpr, BR: tl.constexpr,
                      NSP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)
        h = tl.program_id(0)                 # KV head
        r = tl.program_id(1)                 # its query head r
        js = tl.arange(0, NSP)
        rd = tl.arange(0, HD)
        prow = (h * NSP + js) * BR + r       # partials loaded beside the slot, not after it (one round trip)
        m = tl.load(ml_ptr + prow * 2)
        l_ = tl.load(ml_ptr + prow * 2 + 1)
        ov = tl.load(o_ptr + prow[:, None] * HD + rd[None, :])                                   # [NSP, HD]
        slot = tl.load(slot_ptr).to(tl.int32)
        per = tl.cdiv(tl.cdiv(slot + 1, NSP), BLOCK) * BLOCK
        if tl.cdiv(slot + 1, per) > 1:       # else the split kernel wrote y itself (and the partials are stale)
            w = tl.exp(m - tl.max(m, axis=0))
            yv = tl.sum(w[:, None] * ov, axis=0) / tl.sum(w * l_, axis=0)
            tl.store(y_ptr + (h * REP + r) * HD + rd, yv.to(y_ptr.dtype.element_ty))


@torch.library.custom_op("specq::decode_attn", mutates_args=("kc", "vc"))
def _decode_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor,
               vc: torch.Tensor, mask: torch.Tensor, nh: int, nkv: int) -> torch.Tensor:
    if usable(qkv, kc, vc, mask):
        return _run(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)
    return decode_attention_ref(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)


@_decode_op.register_fake
def _(qkv, cos, sin, slots, kc, vc, mask, nh, nkv):
    return qkv.new_empty(1, nh * kc.shape[-1])
