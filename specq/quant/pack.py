"""Bit packing and round-to-nearest quantization (the reference every kernel must match).

Packing (2, 3, 4 bit): each output row n is one little-endian bit stream of int32 words;
code k occupies bits [b*k, b*k + b) of that stream.
  4 bit: qweight int32 [N, K//8]; nibble j (bits 4j..4j+3) of word w = q[n, 8w+j]   (CANONICAL)
  2 bit: qweight int32 [N, K//16]; bits 2j..2j+1 of word w = q[n, 16w+j]
  3 bit: qweight int32 [N, 3*K//32]; 32 codes fill 3 words; code 32b+i starts at bit 3i of the
         96-bit group b (words 3b..3b+2); codes i=10 and i=21 straddle two words.
Codes are unsigned 0..2^b-1. W = (q - zeros) * scales with scales, zeros [N, K//G] (per channel: G = K);
symmetric uses zero = 2^(b-1) (8 for 4 bit) and scale = 2*absmax / (2^b - 1) (the GPTQ convention).
"""
from __future__ import annotations

import torch

from ..errors import SpecqError

BITS = (2, 3, 4)
GROUPS = (32, 64, 128, -1)


def words_per_row(K: int, bits: int) -> int:
    return K * bits // 32


def check_shape(K: int, bits: int, group_size: int) -> int:
    """Validate (bits, group size) for K input channels; returns the effective group size G."""
    if bits not in BITS:
        raise SpecqError(f"unsupported weight bits {bits} (supported: 2, 3, 4)")
    if group_size not in GROUPS:
        raise SpecqError(f"unsupported group size {group_size} (supported: 32, 64, 128, -1 = per channel)")
    G = K if group_size == -1 else group_size
    if K % G:
        raise SpecqError(f"group size {group_size} does not divide the input dimension {K} "
                         f"(pick a group size that divides it, or fit_group=True / --fit-group)")
    if K % 32:
        raise SpecqError(f"input dimension {K} must be a multiple of 32 for {bits}-bit packing")
    return G


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes q [N, K] (0..2^bits-1) -> int32 [N, K*bits//32]."""
    N, K = q.shape
    q = q.to(torch.int64)
    if bits in (2, 4):                                      # whole codes per word: shift and sum
        per = 32 // bits
        sh = torch.arange(per, device=q.device) * bits
        w = (q.view(N, K // per, per) << sh).sum(-1)       # [N, W] in 0..2^32-1
    else:                                                   # generic bit stream
        bitv = (q[..., None] >> torch.arange(bits, device=q.device)) & 1          # [N, K, b]
        bitv = bitv.reshape(N, K * bits // 32, 32)
        w = (bitv << torch.arange(32, device=q.device)).sum(-1)
    return (w - ((w >> 31) << 32)).to(torch.int32)          # wrap to signed int32


def unpack(qw: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """int32 [N, K*bits//32] -> codes uint8 [N, K]."""
    N = qw.shape[0]
    w = qw.to(torch.int64) & 0xFFFFFFFF
    if bits in (2, 4):
        per = 32 // bits
        sh = torch.arange(per, device=qw.device) * bits
        return ((w[..., None] >> sh) & ((1 << bits) - 1)).reshape(N, K).to(torch.uint8)
    bitv = (w[..., None] >> torch.arange(32, device=qw.device)) & 1                # [N, W, 32]
    bitv = bitv.reshape(N, K, bits)
    return (bitv << torch.arange(bits, device=qw.device)).sum(-1).to(torch.uint8)


def group_params(w: torch.Tensor, bits: int, sym: bool, clip=None):
    """Scale and zero for rows of w [..., G] (one group per row): returns scale, zero [...] float32."""
    w = w.float()
    maxq = (1 << bits) - 1
    if sym:
        amax = w.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = w.amin(-1).clamp(max=0)
        hi = w.amax(-1).clamp(min=0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = (hi - lo) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # all-zero group
    return scale, zero


def quant_codes(w, scale, zero, bits):
    """w [..., G], scale/zero [...] -> codes (float, integer valued)."""
    return torch.clamp(torch.round(w.float() / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)


def rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool, clip=None):
    """Round-to-nearest: W [N, K] -> codes uint8 [N, K], scales, zeros float32 [N, K//G].

    clip: optional [N, K//G] ratio applied to the group range (AWQ clipping search)."""
    N, K = W.shape
    G = check_shape(K, bits, group_size)
    Wg = W.float().reshape(N, K // G, G)
    scale, zero = group_params(Wg, bits, sym, clip)
    q = quant_codes(Wg, scale, zero, bits)
    return q.reshape(N, K).to(torch.uint8), scale, zero


def dequant(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32):
    """codes [N, K], scales/zeros [N, K//G] -> W [N, K] = (q - zero) * scale in `dtype`."""
    N, K = q.shape
    ng = scales.shape[1]
    qg = q.to(dtype).view(N, ng, K // ng)
    return ((qg - zeros.to(dtype)[..., None]) * scales.to(dtype)[..., None]).reshape(N, K)
