"""Integer-activation formats: W8A8 (SmoothQuant) and W4A8 (QQQ/QoQ style), drop-in nn.Linear swaps.

Activations: dynamic per-token symmetric int8, sx = absmax(x_row) / 127, xq = round(x / sx).
  W8A8: wq int8 [N, K] per output channel, sw [N] float: y = (xq @ wq^T) * sx * sw.
  W4A8: 4-bit codes in the canonical nibble layout (qweight int32 [N, K//8], code = w4 + 8, w4 in -8..7);
        per channel: w8 = w4;  group G (128, or 32/64): w8 = w4 * gscale[n, k//G], integer gscale int8 [N, K//G]
        in 1..16, so w8 is an int8 value; then y = (xq @ w8^T) * sx * sw, sw [N] float.
The reference integer matmul is exact: fp32 products of int8 values summed over chunks of <= 1024
(|partial| < 2^24 stays exact in fp32), chunks added in float64.
SmoothQuant scales (per input channel) are folded into the previous op by specq.quant.calib.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import opaque
from . import pack as P
from ..errors import SpecqError


def quant_act(x):
    """Per-token int8: x [M, K] -> xq (float, int valued) [M, K], sx [M, 1] float32."""
    xf = x.float()
    sx = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(xf / sx).clamp(-127, 127), sx


def int_matmul(a, b):
    """Exact a [M, K] @ b[N, K]^T for int8-valued float tensors -> float64 [M, N]."""
    K = a.shape[-1]
    out = None
    for k0 in range(0, K, 1024):
        part = (a[:, k0:k0 + 1024].float() @ b[:, k0:k0 + 1024].float().t()).double()
        out = part if out is None else out + part
    return out


_KERNELS: dict = {}


def register_kernel(fn, cls_name: str):
    """Register fn(x [M, K], module) -> x @ W^T [M, N] (no bias) or None (unsupported) for CUDA inputs."""
    _KERNELS[cls_name] = fn


class _IntActLinear(nn.Module):
    def int_weight(self):  # [N, K] int8-valued float32
        raise NotImplementedError

    def dequantize(self):  # [N, K] weight the integer math represents
        return (self.int_weight() * self.sw.float()[:, None]).to(self.sw.dtype)

    def matmul2d(self, x2):  # x2 [M, K] -> [M, N] in x2's dtype, no bias
        if x2.is_cuda:   # Triton int8 tensor-core kernels (specq.kernels.int8); None -> the reference below
            if not _KERNELS:
                import specq.kernels  # noqa: F401  (registers them)
            fn = _KERNELS.get(type(self).__name__)
            y = fn(x2, self) if fn is not None else None
            if y is not None:
                return y
        xq, sx = quant_act(x2)
        return (int_matmul(xq, self.int_weight()) * sx.double() * self.sw.double()[None, :]).to(x2.dtype)

    def forward(self, x):  # x [..., K]
        shp = x.shape
        y = opaque.matmul(self, x.reshape(-1, shp[-1])).reshape(*shp[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class W8A8Linear(_IntActLinear):
    bits = 8

    def __init__(self, K, N, bias=False, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = K, N, -1
        self.register_buffer("wq", torch.zeros(N, K, dtype=torch.int8, device=device))
        self.register_buffer("sw", torch.ones(N, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear):
        W = lin.weight.data.float()
        N, K = W.shape
        m = cls(K, N, lin.bias is not None, lin.weight.dtype, W.device)
        sw = (W.abs().amax(1) / 127).clamp(min=1e-8)
        m.wq.copy_(torch.round(W / sw[:, None]).clamp(-127, 127).to(torch.int8))
        m.sw.copy_(sw)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.data)
        return m

    def int_weight(self):
        return self.wq.float()


class W4A8Linear(_IntActLinear):
    bits = 4

    def __init__(self, K, N, group_size=-1, bias=False, dtype=torch.float32, device=None):
        super().__init__()
        G = P.check_shape(K, 4, group_size)
        self.in_features, self.out_features, self.group_size = K, N, group_size
        self.register_buffer("qweight", torch.zeros(N, K // 8, dtype=torch.int32, device=device))
        self.register_buffer("gscale", torch.ones(N, K // G, dtype=torch.int8, device=device) if group_size != -1 else None)
        self.register_buffer("sw", torch.ones(N, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    @staticmethod
    def channel_scale(W, group_size):
        """Per-channel fp scale [N]: w4 range for per channel, the 4x16 int8 range for groups."""
        amax = W.float().abs().amax(1).clamp(min=1e-8)
        return amax / (7.0 if group_size == -1 else 112.0)

    @staticmethod
    def group_scale(Wc_g):
        """Integer group scale for W / sw values Wc_g [..., G] -> [...] in 1..16."""
        return torch.round(Wc_g.abs().amax(-1) / 7).clamp(1, 16)

    @classmethod
    def from_codes(cls, w4, sw, gscale=None, bias=None, dtype=torch.float32):
        """w4 [N, K] integer values -8..7, sw [N], gscale [N, K//G] integer or None."""
        N, K = w4.shape
        m = cls(K, N, -1 if gscale is None else K // gscale.shape[1], bias is not None, dtype, w4.device)
        m.qweight.copy_(P.pack((w4 + 8).to(torch.uint8), 4))
        m.sw.copy_(sw)
        if gscale is not None:
            m.gscale.copy_(gscale.to(torch.int8))
        if bias is not None:
            m.bias.copy_(bias)
        return m

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size=-1):
        """Round-to-nearest: per channel, or QQQ-style two-level (fp channel x integer group)."""
        W = lin.weight.data.float()
        N, K = W.shape
        sw = cls.channel_scale(W, group_size)
        Wc = W / sw[:, None]
        if group_size == -1:
            return cls.from_codes(torch.round(Wc).clamp(-8, 7), sw, None, lin.bias, lin.weight.dtype)
        G = P.check_shape(K, 4, group_size)
        Wg = Wc.view(N, K // G, G)
        gs = cls.group_scale(Wg)
        w4 = torch.round(Wg / gs[..., None]).clamp(-8, 7).view(N, K)
        return cls.from_codes(w4, sw, gs, lin.bias, lin.weight.dtype)

    def int_weight(self):
        w4 = P.unpack(self.qweight, 4, self.in_features).float() - 8       # [N, K]
        if self.gscale is None:
            return w4
        N, K = w4.shape
        return (w4.view(N, self.gscale.shape[1], -1) * self.gscale.float()[..., None]).view(N, K)
