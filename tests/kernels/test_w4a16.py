"""W4A16 kernel: layouts and launch rules on CPU; the Triton kernel itself under TRITON_INTERPRET=1."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from specq.kernels import ref
from specq.kernels.w4a16 import default_config, prepare_w4a16, repack_int4, w4a16_linear

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_repack_layouts():
    q = torch.randint(0, 16, (3, 256))
    canon = ref.pack_int4(q)
    s = ref.unpack_int4(repack_int4(canon, True)).view(3, 2, 16, 2, 4)      # [n, block, w, h, j]
    p = ref.unpack_int4(repack_int4(canon, False)).view(3, 32, 2, 4)        # [n, w, h, j]
    for w in (0, 5, 15):
        for h in (0, 1):
            for j in range(4):   # slices: k = 128 b + 32 j + 2 w + h; pairs: k = 8 w + 2 j + h
                assert torch.equal(s[:, 1, w, h, j], q[:, 128 + 32 * j + 2 * w + h])
                assert torch.equal(p[:, w, h, j], q[:, 8 * w + 2 * j + h])


def test_tile_major_layout():
    """tile_major stores block b of row n (16 words) at tile (n // 64, b), row n % 64: one contiguous 4 KB run."""
    from specq.kernels.w4a16 import tile_major
    w = torch.arange(128 * 64, dtype=torch.int32).view(128, 64)          # N=128 rows, K=512 (4 blocks)
    t = tile_major(w).view(-1)
    for n, b in ((0, 0), (5, 1), (63, 3), (64, 0), (127, 2)):
        o = ((n // 64) * 4 + b) * 64 * 16 + (n % 64) * 16
        assert torch.equal(t[o:o + 16], w[n, 16 * b:16 * b + 16])
    q, s, z = ref.random_w4a16(128, 512, 128, sym=True, dtype=torch.bfloat16)
    assert prepare_w4a16(q, s, z, 128).tiled and not prepare_w4a16(q, s, z, 128, tiled=False).tiled
    q, s, z = ref.random_w4a16(96, 512, 128, sym=True, dtype=torch.bfloat16)
    assert not prepare_w4a16(q, s, z, 128).tiled                         # N % 64 != 0: row-major words


def test_prepare_scales_per_block_and_fallback():
    q, s, z = ref.random_w4a16(8, 512, 256, sym=False, dtype=torch.bfloat16)
    w = prepare_w4a16(q, s, z, 256)
    assert w.group_size == 256 and w.scales.shape == (4, 8) and torch.equal(w.scales[1], s[:, 0])
    assert torch.equal(w.zeros[3], z[:, 1]) and int(w.locks.abs().sum()) == 0
    pc = prepare_w4a16(q, s[:, :1], z[:, :1], None)                           # per channel: repeated
    assert pc.scales.shape == (4, 8) and torch.equal(pc.scales[2], s[:, 0])
    zf = z.float() + 0.5                                                      # fractional zeros: torch path
    fb = prepare_w4a16(q, s, zf.to(torch.bfloat16), 256)
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    assert fb.group_size == -1
    r = ref.ref_w4a16(x, q, s, zf.to(torch.bfloat16))
    assert ((w4a16_linear(x, fb).float() - r.float()).norm() / r.float().norm()) < 1e-2


def test_default_config_fills_the_gpu():
    for M in (1, 2, 16, 17, 32, 64, 128):
        for N, K in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (57344, 8192), (8192, 28672)):
            BM, BN, split, R, nw, ns, pre = default_config(M, N, K)
            assert BM >= min(M, 64) and BM in (16, 32, 64) and (K // 128) % (split * R) == 0
            assert -(-N // BN) * -(-M // BM) * split >= 224 and split <= 16


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
from specq.kernels.w4a16 import prepare_w4a16, w4a16_linear
torch.manual_seed(0)
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
bad = []
for sl in (True, False):
    for M, N, K, G, sym, dt, cfg in [(1, 32, 1024, 128, True, torch.bfloat16, (16, 32, 4, 2, 4, 1)),
                                     (3, 48, 2048, None, False, torch.float16, (16, 32, 4, 2, 4, 1, True)),
                                     (17, 32, 256, 128, False, torch.bfloat16, None),
                                     (2, 64, 2048, 128, False, torch.bfloat16, (16, 64, 2, 2, 4, 1)),
                                     (5, 64, 1024, 128, False, torch.bfloat16, (16, 64, 1, 1, 4, 1)),
                                     (40, 64, 768, 256, False, torch.bfloat16, (32, 32, 3, 1, 4, 1, True)),
                                     # packed scale/zero loads: in the loop (1), one tile before it (2, PER 3 -> PERP 4)
                                     (2, 64, 2048, 128, False, torch.bfloat16, (16, 64, 2, 2, 4, 1, False, 1)),
                                     (3, 48, 1536, None, False, torch.float16, (16, 32, 4, 1, 4, 1, False, 2)),
                                     (1, 64, 3072, 128, True, torch.bfloat16, (16, 64, 8, 1, 4, 1, True, 2))]:
        q, s, z = ref.random_w4a16(N, K, G, sym, dt)
        x = torch.randn(M, K).to(dt)
        for tiled in ((True, False) if N % 64 == 0 else (False,)):
            w = prepare_w4a16(q, s, z, G, dt, slices=sl, tiled=tiled, packed=bool(cfg and len(cfg) > 7 and cfg[7]))
            e = rel(w4a16_linear(x, w, cfg=cfg), ref.ref_w4a16(x, q, s, z))
            if not e < 1e-2 or int(w.locks.abs().sum()) or w.tiled != tiled:
                bad.append((sl, tiled, M, N, K, e))
q, s, z = ref.random_w4a16(32, 256, 128, False, torch.float32)   # fp32 x: the exact torch path
x = torch.randn(2, 256)
if not torch.allclose(w4a16_linear(x, q, s, z, 128), x @ ref.dequant_w4(q, s, z).T, rtol=1e-5, atol=1e-5):
    bad.append("fp32")
try:       # a packed mode without the packed words is refused, not silently run as mode 0
    w4a16_linear(torch.randn(1, 256).to(torch.bfloat16), prepare_w4a16(q, s.bfloat16(), z.bfloat16(), 128),
                 cfg=(16, 32, 1, 1, 4, 1, False, 2))
    bad.append("unpacked mode 2 ran")
except Exception as e:
    if "packed" not in str(e):
        bad.append(("wrong error", str(e)[:100]))
print("BAD", bad) if bad else print("ALLOK")
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (CPU CI): interpreter kernel test skipped")
def test_w4a16_kernel_interpreted():
    """Both layouts, split K (counters back to zero), prescaled weights, fp16, per channel, M = 1..40."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", INTERP], env=env, capture_output=True, text=True, timeout=240)
    assert "ALLOK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_prepared_weight_cache_inference_tensors():
    """A model built under torch.inference_mode has weights without a version counter: the kernel-layout cache
    still works (same object on the second call) instead of raising."""
    import torch.nn as nn
    from specq.kernels import wq_w4a16
    from specq.kernels.common import version
    from specq.quant.wq import WQLinear
    with torch.inference_mode():
        wq = WQLinear.from_linear(nn.Linear(256, 64), 4, 128)
        assert version(wq.qweight) == -1
        w1 = wq_w4a16(wq, torch.bfloat16)
        assert wq_w4a16(wq, torch.bfloat16) is w1
        x = torch.randn(2, 256)
        q, s, z = w1.raw
        y = w4a16_linear(x, q, s, z, 128)          # the module-free cache path too
        assert torch.allclose(y, x @ ref.dequant_w4(q, s, z).T, atol=1e-4)
    t = torch.zeros(3)
    assert version(t) == 0 and version(t.add_(1)) == 1
