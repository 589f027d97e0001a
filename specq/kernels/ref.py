"""Plain-torch reference math for every kernel format, defined from the storage layouts alone.

Canonical 4-bit layout (shared with specq.quant):
  qweight int32 [N, K//8]: nibble j (bits 4j..4j+3) of word w holds unsigned code q[n, 8w+j] in 0..15
  scales, zeros [N, K//G] (same float dtype); W = (q - zeros) * scales; per-channel: G = K.
W8A8: w int8 [N, K], sw fp32 [N]; activations quantized per token: sx = max|x|/127, xq = round(x/sx).
W4A8: 4-bit codes in the canonical layout read as signed c = q - 8, int group scales gs [N, K//128]
  (so c * gs is an int8 value) or None (per channel), fp32 channel scale sw [N]: W = c * gs * sw.
y[M, N] = x[M, K] @ W^T in x's dtype. Rounding of activations is floor(v + 0.5) (kernels match it).
"""
from __future__ import annotations

import torch

from ..errors import SpecqError

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j sits at bit 4j
_SHIFTS: dict = {}


def shifts(device, dtype=torch.int32) -> torch.Tensor:
    """SHIFTS on `device`, made once (no host-to-device copy per call: safe inside CUDA graph capture)."""
    key = (str(device), dtype)
    t = _SHIFTS.get(key)
    if t is None:
        t = _SHIFTS[key] = SHIFTS.to(device, dtype)
    return t


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] in 0..15 -> qweight int32 [N, K//8] (canonical layout)."""
    N, K = q.shape
    if K % 8:
        raise SpecqError(f"pack_int4: K={K} is not a multiple of 8")
    q = q.to(torch.int64).view(N, K // 8, 8) << shifts(q.device, torch.int64)
    w = q.sum(-1)                                          # fits in 32 unsigned bits
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [N, K//8] -> q int32 [N, K] in 0..15."""
    N, W = qweight.shape
    return ((qweight.unsqueeze(-1) >> shifts(qweight.device)) & 0xF).reshape(N, W * 8)


def _expand(t: torch.Tensor, K: int) -> torch.Tensor:
    """[N, K//G] -> [N, K] by repeating each group's value G times."""
    if K % t.shape[1]:
        raise SpecqError(f"{t.shape[1]} groups do not divide K={K}")
    return t.repeat_interleave(K // t.shape[1], dim=1)


def dequant_w4(qweight, scales, zeros) -> torch.Tensor:
    """W float32 [N, K] = (q - zeros) * scales."""
    q = unpack_int4(qweight).float()
    K = q.shape[1]
    return (q - _expand(zeros.float(), K)) * _expand(scales.float(), K)


def ref_w4a16(x, qweight, scales, zeros, group_size=None):
    """x [M, K] (bf16/fp16) -> y [M, N] in x.dtype, computed in float32."""
    W = dequant_w4(qweight, scales, zeros)
    if group_size is not None and scales.shape[1] * group_size != W.shape[1]:
        raise SpecqError(f"group_size {group_size} does not match scales {tuple(scales.shape)}")
    return (x.float() @ W.T).to(x.dtype)


def quant_act(x: torch.Tensor):
    """Per-token dynamic int8: x [M, K] -> (xq int8 [M, K], sx float32 [M])."""
    xf = x.float()
    sx = xf.abs().amax(1).clamp_min(1e-8) / 127.0
    xq = torch.floor(xf / sx[:, None] + 0.5).clamp(-127, 127).to(torch.int8)
    return xq, sx


def ref_w8a8(x, w8, sw):
    """x [M, K], w8 int8 [N, K], sw float [N] -> y [M, N] in x.dtype."""
    xq, sx = quant_act(x)
    acc = xq.double() @ w8.double().T                     # exact integer sums
    return (acc * sx.double()[:, None] * sw.double()[None, :]).to(x.dtype)


def w4a8_int8_weight(qweight, group_scales=None) -> torch.Tensor:
    """The int8 weight values c * gs [N, K] (int32) of a W4A8 weight."""
    c = unpack_int4(qweight) - 8
    if group_scales is not None:
        c = c * _expand(group_scales.to(torch.int32), c.shape[1])
    if c.abs().max() > 128:
        raise SpecqError("W4A8 group scales make values outside int8")
    return c


def ref_w4a8(x, qweight, sw, group_scales=None):
    """x [M, K], canonical 4-bit qweight (c = q - 8), int group scales [N, K//128] or None, sw [N]."""
    xq, sx = quant_act(x)
    acc = xq.double() @ w4a8_int8_weight(qweight, group_scales).double().T
    return (acc * sx.double()[:, None] * sw.double()[None, :]).to(x.dtype)


# ---- random weights in each format (tests and benchmarks; never all-zero) ----

def random_w4a16(N, K, group_size, sym=True, dtype=torch.bfloat16, device="cpu", gen=None):
    G = K if group_size in (None, -1, 0) else group_size
    q = torch.randint(0, 16, (N, K), generator=gen, device="cpu").to(device)
    scales = (torch.rand(N, K // G, generator=gen) * 0.02 + 0.002).to(device, dtype)
    if sym:
        zeros = torch.full((N, K // G), 8, dtype=dtype, device=device)
    else:
        zeros = torch.randint(0, 16, (N, K // G), generator=gen).to(device, dtype)
    return pack_int4(q), scales, zeros


def random_w8a8(N, K, device="cpu", gen=None):
    w8 = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device)
    sw = (torch.rand(N, generator=gen) * 1e-3 + 1e-4).to(device)
    return w8, sw


def random_w4a8(N, K, grouped, device="cpu", gen=None):
    q = torch.randint(0, 16, (N, K), generator=gen)
    gs = torch.randint(1, 17, (N, K // 128), generator=gen, dtype=torch.int32) if grouped else None
    sw = (torch.rand(N, generator=gen) * 1e-3 + 1e-4)
    return pack_int4(q).to(device), sw.to(device), (gs.to(device) if grouped else None)
