"""specq.kernels on CPU: reference math + layout, and the Triton kernels under TRITON_INTERPRET=1."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from specq.errors import SpecqError
from specq.kernels import ref
from specq.kernels.common import interleave_int4
from specq.kernels.int8 import prepare_w4a8, w4a8_linear, w8a8_linear
from specq.kernels.w4a16 import prepare_w4a16, w4a16_linear

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_pack_unpack_roundtrip_and_bit_order():
    q = torch.randint(0, 16, (5, 64))
    w = ref.pack_int4(q)
    assert w.dtype == torch.int32 and w.shape == (5, 8)
    assert torch.equal(ref.unpack_int4(w), q)
    one = torch.zeros(1, 8, dtype=torch.long)
    one[0, 3] = 15                                  # k = 3 -> word 0, bits 12..15
    assert ref.pack_int4(one)[0, 0].item() == 15 << 12


def test_interleave_layout():
    q = torch.randint(0, 16, (3, 256))
    p = ref.unpack_int4(interleave_int4(ref.pack_int4(q), 16)).view(3, 2, 16, 8)   # [n, block, w, j]
    for b in range(2):
        for j in range(8):  # nibble j of the block's 16 words = k slice 128b + 16j .. +16
            assert torch.equal(p[:, b, :, j], q[:, 128 * b + 16 * j: 128 * b + 16 * j + 16])
    s = ref.unpack_int4(interleave_int4(ref.pack_int4(q), 32, xor=8)).view(3, 1, 32, 8)
    assert torch.equal(s[:, 0, :, 5], q[:, 160:192] ^ 8)


def test_reference_math_matches_dense():
    torch.manual_seed(0)
    q, s, z = ref.random_w4a16(16, 256, 128, sym=False, dtype=torch.float32)
    x = torch.randn(3, 256)
    W = (ref.unpack_int4(q).float() - z.repeat_interleave(128, 1)) * s.repeat_interleave(128, 1)
    assert torch.allclose(ref.ref_w4a16(x, q, s, z, 128), x @ W.T, atol=1e-4)
    xq, sx = ref.quant_act(x)
    assert xq.abs().max() == 127 and torch.allclose(xq.float() * sx[:, None], x, atol=sx.max().item())
    w8, sw = ref.random_w8a8(16, 256)
    assert rel(ref.ref_w8a8(x, w8, sw), x @ (w8.float() * sw[:, None]).T) < 2e-2


def test_fallbacks_on_cpu_and_errors():
    torch.manual_seed(1)
    q, s, z = ref.random_w4a16(24, 96, None, sym=True, dtype=torch.float32)   # K % 128 != 0: torch path
    x = torch.randn(2, 96)
    assert rel(w4a16_linear(x, q, s, z, None), ref.ref_w4a16(x, q, s, z)) < 1e-5
    with pytest.raises(SpecqError):
        prepare_w4a16(q, s[:, :1].repeat(1, 2), z, 128)
    q4, sw, gs = ref.random_w4a8(8, 256, True)
    with pytest.raises(SpecqError):
        prepare_w4a8(q4, sw, gs * 0)
    with pytest.raises(SpecqError):
        w4a8_linear(torch.randn(1, 128), q4, sw, gs)


INTERP = r'''
import numpy as np
import torch
import triton.runtime.interpreter as I
_orig = I._patch_lang_tensor
def _patch(tensor, scope):   # numpy >= 2 refuses int() of the interpreter's 1-element scalars
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
I._patch_lang_tensor = _patch
from specq.kernels import ref
from specq.kernels.w4a16 import w4a16_linear
from specq.kernels.int8 import w8a8_linear, w4a8_linear
torch.manual_seed(0)
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
bad = []
for M, N, K, G, sym, dt in [(1, 32, 256, 128, True, torch.bfloat16), (3, 48, 512, None, False, torch.float16),
                            (17, 32, 256, 128, False, torch.bfloat16)]:
    q, s, z = ref.random_w4a16(N, K, G, sym, dt)
    x = torch.randn(M, K).to(dt)
    e = rel(w4a16_linear(x, q, s, z, G), ref.ref_w4a16(x, q, s, z))
    bad += [("w4a16", M, e)] if not e < 1e-2 else []
for M in (1, 18):
    x = torch.randn(M, 512).to(torch.bfloat16)
    w8, sw = ref.random_w8a8(40, 512)
    e = rel(w8a8_linear(x, w8, sw), ref.ref_w8a8(x, w8, sw))
    bad += [("w8a8", M, e)] if not e < 1e-2 else []
    for g in (False, True):
        q, sw, gs = ref.random_w4a8(32, 512, g)
        e = rel(w4a8_linear(x, q, sw, gs), ref.ref_w4a8(x, q, sw, gs))
        bad += [("w4a8", g, M, e)] if not e < 1e-2 else []
print("BAD", bad) if bad else print("ALLOK")
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (CPU CI): interpreter kernel tests skipped")
def test_triton_kernels_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    r = subprocess.run([sys.executable, "-c", INTERP], env=env, capture_output=True, text=True, timeout=240)
    assert "ALLOK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_wqlinear_kernel_hook_matches_module():
    """The glue WQLinear calls on CUDA computes the module's own math (also with an act-order perm)."""
    import specq.kernels as K
    from specq.quant.wq import WQLinear, _KERNELS
    assert _KERNELS.get((4, "rowpack")) is K.wq_kernel
    torch.manual_seed(0)
    for gs in (128, -1):
        lin = torch.nn.Linear(256, 96, bias=False)
        m = WQLinear.from_linear(lin, 4, gs, True)
        x = torch.randn(5, 256)
        ref = m(x)                                   # CPU: reference path
        x2 = x if m.perm is None else x[:, m.perm]
        torch.testing.assert_close(K.wq_kernel(x2, m), ref, atol=1e-4, rtol=1e-4)


def test_int8_module_hooks_match_modules():
    """W8A8Linear / W4A8Linear on CUDA call these hooks; on CPU they must give the module's own math,
    and W4A8 with a group size the kernel lacks (64) must decline (None -> reference path)."""
    import specq.kernels as K
    from specq.quant import w8a8 as Q
    assert Q._KERNELS["W8A8Linear"] is K.w8a8_kernel and Q._KERNELS["W4A8Linear"] is K.w4a8_kernel
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False)
    x = torch.randn(5, 256)
    m = Q.W8A8Linear.from_linear(lin)
    torch.testing.assert_close(K.w8a8_kernel(x, m), m(x), atol=1e-4, rtol=1e-4)
    for gs in (-1, 128):
        m = Q.W4A8Linear.from_linear(lin, gs)
        torch.testing.assert_close(K.w4a8_kernel(x, m), m(x), atol=1e-4, rtol=1e-4)
    assert K.w4a8_kernel(x, Q.W4A8Linear.from_linear(lin, 64)) is None
