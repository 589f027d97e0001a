"""Programmatic dependent launch plumbing (GPU-only at run time): the ctypes mirrors of the CUDA 12 launch structs
have the C layout, arguments convert as torch's launcher converts them, and the w4mma source with PDL waits for the
previous kernel before anything else."""
import ctypes

import pytest
import torch

from specq.errors import SpecqError
from specq.kernels import pdl, w4mma


def test_struct_layout_matches_cuda_h():
    assert ctypes.sizeof(pdl.LaunchAttribute) == 72                 # id (4) + pad (4) + 64-byte value union
    assert pdl.LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(pdl.LaunchConfig) == 56                    # 7 uints, padding, stream, attrs, numAttrs
    assert pdl.LaunchConfig.hStream.offset == 32 and pdl.LaunchConfig.attrs.offset == 40
    cfg, attr = pdl.config((3, 2, 1), (256, 1, 1), 0x1234)
    assert (cfg.gridDimX, cfg.gridDimY, cfg.blockDimX, cfg.numAttrs, cfg.hStream) == (3, 2, 256, 1, 0x1234)
    assert cfg.attrs.contents.id == pdl.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert cfg.attrs.contents.value.programmatic_stream_serialization_allowed == 1


def test_kernel_args():
    t = torch.zeros(4)
    arr, keep = pdl.kernel_args([t, 7])
    assert len(arr) == 2 and keep[0].value == t.data_ptr() and keep[1].value == 7
    assert ctypes.cast(arr[1], ctypes.POINTER(ctypes.c_int)).contents.value == 7
    with pytest.raises(SpecqError):
        pdl.kernel_args([1.5])


def test_w4mma_source_waits_first():
    """pdl=True: griddepcontrol.wait, then launch_dependents, before any load; pdl=False: no PDL code compiled in."""
    src = w4mma.source(1, 8, 8, 16, False, 2, pdl=True)
    assert "#define PDL 1" in src
    body = src[src.index("w4mma(const uint4*"):]
    wait = body.index("griddepcontrol.wait")
    assert wait < body.index("griddepcontrol.launch_dependents") < body.index("wb[i] = ldw(")
    assert "#define PDL 0" in w4mma.source(1, 8, 8, 16, False, 2)


def test_enabled_only_on_cuda_and_when_asked(monkeypatch):
    monkeypatch.setattr(pdl, "ON", True)
    assert not pdl.enabled("cpu")
    monkeypatch.setattr(pdl, "ON", False)
    assert not pdl.enabled("cuda:0")              # off before any CUDA query
