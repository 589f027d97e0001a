"""Programmatic dependent launch (Hopper+) for NVRTC kernels compiled by torch.cuda._compile_kernel.

torch's launcher calls cuLaunchKernel, which has no launch attributes. Here cuLaunchKernelEx is called through the
same driver library with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: the kernel may start before the
previous kernel in the stream has finished (it must execute griddepcontrol.wait before reading that kernel's
output). Stream capture records the launch as a programmatic edge of the CUDA graph.
On by default on sm_90+ (SPECQ_PDL=0 turns it off): w4mma is launched this way inside CUDA-graph capture, specq's
Triton kernels of the decode step (decode attention, argmax, attention, rope: launch_pdl, with
specq.kernels.common.pdl_enter as their first statement) and inductor's kernels (configure_inductor) always. Each
kernel waits for the previous one first, then lets the next launch begin, so launch latency and the next kernel's
start overlap the end of the previous one. H100, Llama-3-8B W4A16 decode step (bench/dev/pdl_ab.sh, same machine,
greedy tokens identical): 495.8 / 496.4 tok/s against 475.1 / 470.6 without on one H100, 483.4 / 476.8 against
471.7 / 467.8 on another (bench/results/h100/decode_variants.txt, session 11).
"""
from __future__ import annotations

import ctypes
import os

import torch

from ..errors import SpecqError

CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _AttrValue(ctypes.Union):          # CUlaunchAttributeValue: a 64-byte union
    _fields_ = [("pad", ctypes.c_char * 64), ("programmatic_stream_serialization_allowed", ctypes.c_int)]


class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, 4 bytes of padding, value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class LaunchConfig(ctypes.Structure):     # CUlaunchConfig (cuda.h, CUDA 12)
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def kernel_args(args) -> tuple[ctypes.Array, list]:
    """Tensors (and objects with data_ptr(), e.g. a mapped host pointer) -> device pointers, ints -> C int (as torch's
    _CudaKernel does): (void* array, keep-alive list)."""
    keep = []
    for a in args:
        if isinstance(a, torch.Tensor) or (hasattr(a, "data_ptr") and not isinstance(a, int)):
            keep.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, int):
            keep.append(ctypes.c_int(a))
        else:
            raise SpecqError(f"pdl.launch: unsupported kernel argument {type(a).__name__}")
    arr = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in keep])
    return arr, keep


def config(grid, block, stream_handle: int, shared_mem: int = 0, pdl: bool = True) -> tuple[LaunchConfig, LaunchAttribute]:
    """The launch config; pdl=False: no attribute (a plain launch through cuLaunchKernelEx)."""
    attr = LaunchAttribute()
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmatic_stream_serialization_allowed = 1
    cfg = LaunchConfig(*grid, *block, shared_mem, ctypes.c_void_p(stream_handle), ctypes.pointer(attr), int(pdl))
    return cfg, attr


def launch(kernel, grid, block, args, shared_mem: int = 0, stream=None, pdl: bool = True) -> None:
    """Launch a torch.cuda._compile_kernel kernel with programmatic stream serialization allowed (pdl=False: without;
    still the way to pass pointers that are not tensors)."""
    lib = torch.cuda._utils._get_gpu_runtime_library()
    if not hasattr(lib, "cuLaunchKernelEx"):
        raise SpecqError("pdl.launch: the CUDA driver has no cuLaunchKernelEx (CUDA >= 12.0 needed)")
    stream = stream or torch.cuda.current_stream()
    cfg, attr = config(grid, block, stream.cuda_stream, shared_mem, pdl)
    arr, keep = kernel_args(args)
    err = lib.cuLaunchKernelEx(ctypes.byref(cfg), kernel.func, arr, None)
    if err != 0:
        raise SpecqError(f"pdl.launch: cuLaunchKernelEx failed with CUDA error {err}")


ON = os.environ.get("SPECQ_PDL", "1") != "0"      # default on; SPECQ_PDL=0 off (read once: w4mma asks per launch)
_ENABLED: dict = {}


def enabled(device) -> bool:
    """Programmatic dependent launch for this device: not SPECQ_PDL=0, a CUDA device of compute capability >= 9.0 and a
    driver with cuLaunchKernelEx (cached per device)."""
    if not ON:
        return False
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _ENABLED:
        _ENABLED[i] = (torch.cuda.get_device_capability(i)[0] >= 9
                       and hasattr(torch.cuda._utils._get_gpu_runtime_library(), "cuLaunchKernelEx"))
    return _ENABLED[i]


def configure_inductor(device) -> None:
    """Before torch.compile on a PDL device: inductor's Triton kernels wait for their predecessor first and let
    their successor launch early too (torch._inductor.config.triton.enable_pdl)."""
    if enabled(device):
        import torch._inductor.config as inductor_config
        inductor_config.triton.enable_pdl = True
