"""Quantized matmuls as one opaque op under torch.compile.

The GPU kernels of the quantized Linears keep Python state (prepared weight layouts cached on the module,
split-K counters, lazily registered kernels) that dynamo cannot trace with fullgraph=True. While compiling,
a quantized module's matmul becomes `torch.ops.specq.qmatmul(x2, key, N)`: inductor fuses everything around
it (norms, rope, SiLU) and calls the module's own eager matmul at run time (inside CUDA graphs too).
Eager code never goes through the op. The module is named by a handle: a one-element CPU tensor attribute of
the module, looked up by its data pointer in a weak registry. Being a tensor, the handle is a graph input, not
a constant, so every layer of a model shares one compiled graph (compile_blocks: regional compilation).
"""
from __future__ import annotations

import weakref

import torch

_MODULES: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
FORCE = False    # tests: route CPU tensors through the op as well (normally CUDA only)


@torch.library.custom_op("specq::qmatmul", mutates_args=())
def qmatmul(x2: torch.Tensor, handle: torch.Tensor, n: int) -> torch.Tensor:
    """x2 [M, K] -> [M, n] = the matmul (no bias) of the module registered under handle (see handle_of)."""
    return _lookup(handle).matmul2d(x2)


@qmatmul.register_fake
def _(x2, handle, n):
    return x2.new_empty(x2.shape[0], n)


@torch.library.custom_op("specq::qmatmul_fused", mutates_args=())
def qmatmul_fused(x2: torch.Tensor, handle: torch.Tensor, n: int, norm_w: torch.Tensor | None, eps: float,
                  res: torch.Tensor | None) -> torch.Tensor:
    """The registered module's fused2d: [M, n] = res + matmul(rmsnorm(x2)) (specq.models.fused)."""
    return _lookup(handle).fused2d(x2, norm_w, eps, res)


@qmatmul_fused.register_fake
def _(x2, handle, n, norm_w, eps, res):
    return x2.new_empty(x2.shape[0], n)


def _lookup(handle):
    m = _MODULES.get(handle.data_ptr())
    if m is None:
        from ..errors import SpecqError
        raise SpecqError("a compiled quantized Linear is not registered: call specq.quant.opaque.register_all(model) "
                         "before torch.compile (specq's Decoder does)")
    return m


def handle_of(module) -> torch.Tensor:
    """The module's handle (created on first use) after registering the module under it."""
    h = module.__dict__.get("_opaque_handle")
    if h is None:
        h = module.__dict__["_opaque_handle"] = torch.zeros(1, dtype=torch.int8)
    if _MODULES.get(h.data_ptr()) is not module:
        _MODULES[h.data_ptr()] = module
    return h


def register_all(model: torch.nn.Module) -> int:
    """Register every module with a matmul2d (the quantized Linears); returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "matmul2d"):
            handle_of(m)
            if hasattr(m, "prepare_fuse"):     # fusion checks that read tensors happen here, not while tracing
                m.prepare_fuse()
            n += 1
    return n


def _handle_for_compile(module) -> torch.Tensor:
    h = module.__dict__.get("_opaque_handle")
    if h is None:
        from ..errors import SpecqError
        raise SpecqError(f"a quantized Linear ({type(module).__name__}) met torch.compile unregistered: call "
                         "specq.quant.opaque.register_all(model) before compiling (specq's Decoder does)")
    return h


def fused(module, x2: torch.Tensor, norm_w, eps: float, res) -> torch.Tensor:
    """module.fused2d(...), through the opaque op while torch.compile traces a CUDA (or FORCE'd) input."""
    if torch.compiler.is_compiling():
        if x2.is_cuda or FORCE:
            return torch.ops.specq.qmatmul_fused(x2, _handle_for_compile(module), module.out_features, norm_w,
                                                 float(eps), res)
    else:
        handle_of(module)
    return module.fused2d(x2, norm_w, eps, res)


def matmul(module, x2: torch.Tensor) -> torch.Tensor:
    """module.matmul2d(x2), through the opaque op while torch.compile traces a CUDA (or FORCE'd) input."""
    if torch.compiler.is_compiling():
        if x2.is_cuda or FORCE:
            return torch.ops.specq.qmatmul(x2, _handle_for_compile(module), module.out_features)
    else:                                          # eager calls register the module for a later compile
        handle_of(module)
    return module.matmul2d(x2)
