"""Rotary embedding of q and k plus the KV-cache write, in one launch (CUDA; decode and verification).

    q [H, M, hd] = rope(qkv's q part);  kc[:, slots] = rope(qkv's k part);  vc[:, slots] = qkv's v part
    qkv [M, (H + 2 Hkv) hd] (the fused qkv_proj output); cos, sin [M, hd]; slots [M]; kc, vc [Hkv, S, hd]

torch.compile turns these few element-wise ops into three kernels per layer (rope q; rope k + cache write; cache
write of v): ~3.3 us of launches per layer at Llama-3-8B shapes on the H100 for one token
(bench/results/h100/decode_variants.txt). One program per (token, head) here: 1.7 us per layer, decode step 425.0
against 410.5 tok/s with SPECQ_NO_ROPE=1 (same file, session 9). The math is fp32 with one rounding
to the cache dtype, as inductor computes it. Under torch.compile it is one opaque op that mutates the cache
(torch.ops.specq.rope_cache). rope_cache_ref is the plain-torch reference (and the CPU path).
"""
from __future__ import annotations

import os

import torch

from .common import HAS_TRITON, INTERPRET, pdl_launch, tl, triton


NO_ROPE = os.environ.get("SPECQ_NO_ROPE", "0") == "1"     # A/B switch: the separate ops instead


def rope_cache_ref(qkv, cos, sin, slots, kc, vc, nh: int, nkv: int) -> torch.Tensor:
    """The reference (fp32 math, one rounding): writes kc / vc at slots, returns q [H, M, hd]."""
    M = qkv.shape[0]
    hd = kc.shape[-1]
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    c, s = cos.float(), sin.float()

    def rot(x):  # [Hx, M, hd] float
        h = hd // 2
        return x * c + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * s

    qr = rot(q.reshape(M, nh, hd).transpose(0, 1).float()).to(qkv.dtype).contiguous()
    kc.index_copy_(1, slots, rot(k.reshape(M, nkv, hd).transpose(0, 1).float()).to(kc.dtype))
    vc.index_copy_(1, slots, v.reshape(M, nkv, hd).transpose(0, 1).to(vc.dtype))
    return qr


def usable(qkv, kc, vc) -> bool:
    """16-bit qkv and cache of the same dtype, contiguous cache, power-of-two head dim 16..256 (CUDA, or CPU tensors
    under TRITON_INTERPRET=1)."""
    hd = kc.shape[-1]
    return (HAS_TRITON and not NO_ROPE and (qkv.is_cuda or INTERPRET) and qkv.dtype in (torch.float16, torch.bfloat16)
            and kc.dtype == qkv.dtype and vc.dtype == qkv.dtype and kc.is_contiguous() and vc.is_contiguous()
            and hd in (16, 32, 64, 128, 256) and qkv.dim() == 2)


def rope_cache(qkv, cos, sin, slots, kc, vc, nh: int, nkv: int) -> torch.Tensor:
    """rope_cache_ref on the kernel (usable() said it can)."""
    if torch.compiler.is_compiling():
        return torch.ops.specq.rope_cache(qkv, cos, sin, slots, kc, vc, nh, nkv)
    return _run(qkv, cos, sin, slots, kc, vc, nh, nkv)


def _run(qkv, cos, sin, slots, kc, vc, nh, nkv):
    M = qkv.shape[0]
    Hkv, S, hd = kc.shape
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q = torch.empty(nh, M, hd, dtype=qkv.dtype, device=qkv.device)
    P, kw = pdl_launch(qkv.device)
    _rope_kernel[(M, nh + nkv)](qkv, cos, sin, slots.contiguous(), kc, vc, q, M, S, nh, nkv, HD=hd, PDL=P,
                                num_warps=1, **kw)
    return q


if HAS_TRITON:
    from .common import pdl_enter

    @triton.jit(do_not_specialize=["M", "S"])   # no recompile per token count or cache size
    def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, q_ptr, M, S, NH, NKV, HD: tl.constexpr,
                     PDL: tl.constexpr):
        pdl_enter(PDL)
        m = tl.program_id(0)                 # token
        h = tl.program_id(1)                 # q head (h < NH) or KV head h - NH
        H2: tl.constexpr = HD // 2
        r = tl.arange(0, H2)
        row = qkv_ptr + m * (NH + 2 * NKV) * HD
        c1 = tl.load(cos_ptr + m * HD + r).to(tl.float32)
        c2 = tl.load(cos_ptr + m * HD + H2 + r).to(tl.float32)
        s1 = tl.load(sin_ptr + m * HD + r).to(tl.float32)
        s2 = tl.load(sin_ptr + m * HD + H2 + r).to(tl.float32)
        x1 = tl.load(row + h * HD + r).to(tl.float32)          # q head h, or k head h - NH (k follows q)
        x2 = tl.load(row + h * HD + H2 + r).to(tl.float32)
        y1 = x1 * c1 + (-x2) * s1
        y2 = x2 * c2 + x1 * s2
        if h < NH:
            out = q_ptr + (h * M + m) * HD
            tl.store(out + r, y1.to(q_ptr.dtype.element_ty))
            tl.store(out + H2 + r, y2.to(q_ptr.dtype.element_ty))
        else:
            j = h - NH
            slot = tl.load(slot_ptr + m)
            kout = kc_ptr + (j * S + slot) * HD
            tl.store(kout + r, y1.to(kc_ptr.dtype.element_ty))
            tl.store(kout + H2 + r, y2.to(kc_ptr.dtype.element_ty))
            vin = row + (NH + NKV + j) * HD
            vout = vc_ptr + (j * S + slot) * HD
            tl.store(vout + r, tl.load(vin + r))
            tl.store(vout + H2 + r, tl.load(vin + H2 + r))


@torch.library.custom_op("specq::rope_cache", mutates_args=("kc", "vc"))
def _rope_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor,
             vc: torch.Tensor, nh: int, nkv: int) -> torch.Tensor:
    if usable(qkv, kc, vc):
        return _run(qkv, cos, sin, slots, kc, vc, nh, nkv)
    return rope_cache_ref(qkv, cos, sin, slots, kc, vc, nh, nkv)


@_rope_op.register_fake
def _(qkv, cos, sin, slots, kc, vc, nh, nkv):
    return qkv.new_empty(nh, qkv.shape[0], kc.shape[-1])
