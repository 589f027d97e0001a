"""GPU kernels for quantized linears (Triton) and their plain-torch references.

w4a16_linear(x, qweight, scales, zeros, group_size)  int4 weights (canonical layout), bf16/fp16 x
w8a8_linear(x, w8, sw)                                int8 weights, per-token int8 activations
w4a8_linear(x, qweight, sw, group_scales=None)       int4 weights (c = q - 8), int8 activations
prepare_* do the one-time repack; pass their result in place of the weight tensors.
Without CUDA (or without triton) every function falls back to plain torch math.
"""
from .common import HAS_TRITON, version
from .int8 import W4A8Weight, W8A8Weight, prepare_w4a8, prepare_w8a8, quantize_act, w4a8_linear, w8a8_linear
from .ref import ref_w4a8, ref_w4a16, ref_w8a8
from .w4a16 import W4A16Weight, prepare_w4a16, w4a16_linear

__all__ = ["HAS_TRITON", "W4A16Weight", "W4A8Weight", "W8A8Weight", "prepare_w4a16", "prepare_w4a8",
           "prepare_w8a8", "quantize_act", "ref_w4a16", "ref_w4a8", "ref_w8a8", "w4a16_linear",
           "w4a8_linear", "w8a8_linear"]


def wq_w4a16(module, dtype):
    """A 4-bit WQLinear's weights in the kernel layout, prepared once and kept on the module (re-made if its
    weights change)."""
    w = getattr(module, "_w4a16", None)
    key = (version(module.qweight), module.qweight.data_ptr(), dtype)
    if w is None or module._w4a16_key != key:
        w = prepare_w4a16(module.qweight, module.scales, module.zeros, module.group_size, dtype)
        module._w4a16, module._w4a16_key = w, key
    return w


def wq_kernel(x2, module):
    """WQLinear hook: x2 [M, K] (already in the module's packed column order) -> x2 @ W^T [M, N]."""
    return w4a16_linear(x2, wq_w4a16(module, x2.dtype))


def wq_fuse_ok(module) -> bool:
    """A 4-bit WQLinear (CUDA) the few-token CUDA kernel takes: shape, group and small integer zero points."""
    import os
    from . import w4a16, w4mma
    K, N, G = module.in_features, module.out_features, module.group_size
    if os.environ.get("SPECQ_NO_FUSE", "0") == "1":     # A/B switch: the unfused ops around the same kernel
        return False
    if not (w4mma.available() and w4a16.LAYOUTS != "triton" and w4mma.supported(N, K, G)):
        return False
    z = module.zeros.float()
    return bool(((z == z.round()) & (z.abs() <= 64)).all())


def wq_fused(x2, module, norm_w, eps, res):
    """WQLinear.fused2d: res + (rmsnorm(x2) @ W^T) in one w4mma launch (module.can_fuse said it fits)."""
    from . import w4mma
    w = wq_w4a16(module, x2.dtype)
    return w4mma.w4mma_linear(x2, w.mma, norm_w=norm_w, eps=eps, res=res)


def _cached(module, name, key, make):
    w = getattr(module, name, None)
    if w is None or getattr(module, name + "_key", None) != key:
        w = make()
        setattr(module, name, w)
        setattr(module, name + "_key", key)
    return w


def wq_w3a16(module, dtype):
    """A 3-bit WQLinear's weights in the W3A16 kernel layout, prepared once and kept on the module."""
    from .w3a16 import prepare_w3a16
    return _cached(module, "_w3a16", (version(module.qweight), module.qweight.data_ptr(), dtype),
                   lambda: prepare_w3a16(module.qweight, module.scales, module.zeros, module.group_size,
                                         module.in_features, dtype))


def wq3_kernel(x2, module):
    """WQLinear hook, 3 bits: x2 [M, K] (packed column order) -> x2 @ W^T [M, N] (specq.kernels.w3a16)."""
    from .w3a16 import w3a16_linear
    return w3a16_linear(x2, wq_w3a16(module, x2.dtype))


def w8a8_kernel(x2, module):
    """W8A8Linear hook: x2 [M, K] -> [M, N] (int8 tensor cores; activations quantized per token)."""
    w = _cached(module, "_w8a8", (version(module.wq), module.wq.data_ptr()),
                lambda: prepare_w8a8(module.wq, module.sw))
    return w8a8_linear(x2, w)


def w4a8_kernel(x2, module):
    """W4A8Linear hook (per channel or group 128; other group sizes -> None = reference math)."""
    if module.gscale is not None and module.group_size != 128:
        return None
    w = _cached(module, "_w4a8", (version(module.qweight), module.qweight.data_ptr()),
                lambda: prepare_w4a8(module.qweight, module.sw, module.gscale))
    return w4a8_linear(x2, w)


def _register():
    from ..quant.wq import register_kernel
    from ..quant import w8a8
    register_kernel(wq_kernel, bits=4)
    register_kernel(wq3_kernel, bits=3)
    w8a8.register_kernel(w8a8_kernel, "W8A8Linear")
    w8a8.register_kernel(w4a8_kernel, "W4A8Linear")


_register()
