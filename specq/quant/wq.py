"""Weight-only quantized Linear (W4A16 / W3A16 / W2A16): a drop-in swap for nn.Linear.

Buffers (packing in specq.quant.pack; the 4-bit layout is canonical, GPU kernels read exactly it):
  qweight int32 [N, K*bits//32]; scales, zeros [N, K//G] in the compute dtype (zeros hold the
  integer zero point, or 2^(bits-1) when symmetric); W = (q - zeros) * scales.
  perm (optional) long [K]: input-channel order of the packed columns (act-order imports whose
  groups are not contiguous): y = x[:, perm] @ Wp^T, dequantize() returns W in the original order.
Forward: on CUDA, a kernel registered for (bits, "rowpack") is used (set as self.kernel);
otherwise the reference math x @ dequantize()^T (+ bias).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import opaque
from . import pack as P

LAYOUT = "rowpack"
_KERNELS: dict = {}


def register_kernel(fn, bits: int = 4, layout: str = LAYOUT):
    """Register fn(x [M, K], module) -> x @ W^T [M, N] (no bias) for CUDA inputs of (bits, layout)."""
    _KERNELS[(bits, layout)] = fn


class WQLinear(nn.Module):
    def __init__(self, K: int, N: int, bits: int = 4, group_size: int = 128, sym: bool = True,
                 bias: bool = False, dtype=torch.float32, device=None, perm: bool = False):
        super().__init__()
        G = P.check_shape(K, bits, group_size)
        self.in_features, self.out_features = K, N
        self.bits, self.group_size, self.sym, self.layout = bits, group_size, sym, LAYOUT
        self.register_buffer("qweight", torch.zeros(N, P.words_per_row(K, bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(N, K // G, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.full((N, K // G), float(1 << (bits - 1)), dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)
        self.register_buffer("perm", torch.arange(K, device=device) if perm else None)
        self.kernel = None

    @classmethod
    def from_codes(cls, q, scales, zeros, bits, group_size, sym, bias=None, dtype=torch.float32, perm=None):
        """Build from codes q [N, K] (columns in packed order), scales/zeros [N, K//G]."""
        N, K = q.shape
        m = cls(K, N, bits, group_size, sym, bias is not None, dtype, q.device, perm is not None)
        m.qweight.copy_(P.pack(q, bits))
        m.scales.copy_(scales.to(dtype))
        m.zeros.copy_(zeros.to(dtype))
        if bias is not None:
            m.bias.copy_(bias.to(dtype))
        if perm is not None:
            m.perm.copy_(perm)
        return m

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits=4, group_size=128, sym=True, clip=None):
        """Round-to-nearest quantization of an nn.Linear."""
        q, s, z = P.rtn(lin.weight.data, bits, group_size, sym, clip)
        return cls.from_codes(q, s, z, bits, group_size, sym, lin.bias, lin.weight.dtype)

    def codes(self):  # [N, K] uint8, packed column order
        return P.unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self):  # [N, K] in the compute dtype, original column order
        W = P.dequant(self.codes(), self.scales, self.zeros, self.scales.dtype)
        if self.perm is not None:
            W = torch.empty_like(W).index_copy_(1, self.perm, W)
        return W

    def matmul2d(self, x2):  # x2 [M, K] -> [M, N], no bias: the CUDA kernel when registered, else the reference
        if x2.is_cuda:
            if self.kernel is None:
                if (self.bits, self.layout) not in _KERNELS:
                    import specq.kernels  # noqa: F401  (registers the Triton W4A16 kernel)
                self.kernel = _KERNELS.get((self.bits, self.layout))
            if self.kernel is not None:
                return self.kernel(x2[:, self.perm] if self.perm is not None else x2, self)
        return x2 @ self.dequantize().to(x2.dtype).t()

    def w4a16_for(self, dtype):
        """The prepared W4A16 kernel weight (4 bits, CUDA) for callers that launch the kernel themselves
        (fused compensation), else None. Its input columns are in packed order (x[:, perm])."""
        if self.bits != 4 or not self.qweight.is_cuda:
            return None
        from ..kernels import wq_w4a16
        return wq_w4a16(self, dtype)

    def w3a16_for(self, dtype):
        """The prepared W3A16 kernel weight (3 bits, CUDA) for callers that launch the kernel themselves
        (one-token compensation), else None. Its input columns are in packed order (x[:, perm])."""
        if self.bits != 3 or not self.qweight.is_cuda:
            return None
        from ..kernels import wq_w3a16
        return wq_w3a16(self, dtype)

    def prepare_fuse(self) -> bool:
        """Decide (once; reads the zero points) whether the few-token CUDA kernel can take this Linear with a fused
        RMSNorm prologue and residual epilogue (specq.models.fused)."""
        dev = self.qweight.device
        hit = self.__dict__.get("_fuse_ok")                # (device, answer): moving the module asks again
        if hit is None or hit[0] != dev:
            ok = False
            if self.bits == 4 and self.perm is None and self.bias is None and self.qweight.is_cuda:
                from ..kernels import wq_fuse_ok
                ok = wq_fuse_ok(self)
            hit = self.__dict__["_fuse_ok"] = (dev, ok)
        return hit[1]

    def can_fuse(self, x2, norm, residual) -> bool:  # x2 [M, K]; norm: RMSNorm; residual [M, N]
        if not x2.is_cuda or x2.dtype not in (torch.bfloat16, torch.float16):
            return False
        hit = self.__dict__.get("_fuse_ok")
        if hit is None or hit[0] != x2.device:    # decided eagerly (opaque.register_all before a compile, or here)
            if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing() or self.qweight.device != x2.device:
                return False
            self.prepare_fuse()
            hit = self.__dict__["_fuse_ok"]
        if not hit[1]:
            return False
        from ..kernels import w4mma
        M, K = x2.shape[0], self.in_features
        if M > w4mma.MAX_SMALL_M or x2.shape[1] != K:
            return False
        if norm is not None and (not w4mma.fusable(M, K) or norm.weight.dtype != x2.dtype or norm.weight.shape != (K,)):
            return False
        return residual is None or (residual.dtype == x2.dtype and tuple(residual.shape) == (M, self.out_features))

    def fused2d(self, x2, norm_w, eps, res):  # -> res + matmul(rmsnorm(x2)) [M, N], on the CUDA kernel
        from ..kernels import wq_fused
        return wq_fused(x2, self, norm_w, eps, res)

    def forward(self, x):  # x [..., K] -> [..., N]
        shp = x.shape
        y = opaque.matmul(self, x.reshape(-1, shp[-1])).reshape(*shp[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self):
        return f"K={self.in_features}, N={self.out_features}, bits={self.bits}, group_size={self.group_size}, sym={self.sym}"
