"""Linear layers with their neighbours fused in:  y = residual + module(norm(x)).

norm is the decoder's RMSNorm before qkv_proj / gate_up_proj; residual is the stream that o_proj / down_proj add
into. A decode step at 8B shapes spends about as much on such small kernels as on attention
(bench/results/h100/decode_variants.txt); a module that offers
`can_fuse` / `fused2d` (WQLinear on the few-token CUDA kernel, specq.kernels.w4mma) does them inside its matmul
launch. Every other case (nn.Linear, CPU, many tokens, other formats) runs `reference`: the separate torch ops,
in the order and dtype the unfused model used. The decoder never needs to know which one ran.
"""
from __future__ import annotations


def reference(module, x, norm=None, residual=None):
    """x [M, K]; norm: an RMSNorm module; residual [M, N] -> [M, N]."""
    if norm is not None:
        x = norm(x)
    y = module(x)
    return y if residual is None else residual + y


def linear(module, x, norm=None, residual=None):
    """reference(...) in one fused launch where the module can (same result up to the order of float sums)."""
    can = getattr(module, "can_fuse", None)
    if can is not None and x.dim() == 2 and (norm is not None or residual is not None) and can(x, norm, residual):
        from ..quant import opaque                    # (specq.quant imports specq.models)
        return opaque.fused(module, x, None if norm is None else norm.weight, 0.0 if norm is None else float(norm.eps),
                            residual)
    return reference(module, x, norm, residual)
