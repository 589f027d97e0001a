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


TRITON_PDL_KERNELS = [("decode_attn", "_split_kernel"), ("decode_attn", "_merge_kernel"), ("argmax", "_argmax_kernel"),
                      ("attention", "_split_kernel"), ("attention", "_merge_kernel"), ("rope", "_rope_kernel")]


@pytest.mark.parametrize("mod,name", TRITON_PDL_KERNELS)
def test_triton_kernels_wait_first(mod, name):
    """Every Triton kernel launched with launch_pdl takes a PDL flag and calls pdl_enter(PDL) as its first statement
    (a load or store before the wait could read the previous kernel's output before it is written)."""
    import ast
    import importlib
    import inspect
    import textwrap
    from specq.kernels.common import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("no triton")
    fn = getattr(importlib.import_module(f"specq.kernels.{mod}"), name).fn
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    f = tree.body[0]
    assert "PDL" in [a.arg for a in f.args.args]
    body = [s for s in f.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]   # no docstring
    first = body[0]
    assert isinstance(first, ast.Expr) and ast.unparse(first) == "pdl_enter(PDL)"
    src = inspect.getsource(importlib.import_module(f"specq.kernels.{mod}"))
    launch = src[src.index(f"{name}[("):]
    launch = launch[:launch.index(")\n")]
    assert "PDL=P" in launch and "**kw" in launch         # the flag and launch_pdl go together (pdl_launch)


def test_pdl_launch_off_on_cpu():
    from specq.kernels.common import pdl_launch
    assert pdl_launch(torch.device("cpu")) == (False, {})
