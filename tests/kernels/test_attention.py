"""Decode attention kernel (specq.kernels.attention) under TRITON_INTERPRET=1 against the torch reference, and
the reference against torch's SDPA."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specq.kernels.attention import decode_attention_ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reference_matches_sdpa():
    torch.manual_seed(0)
    H, Hkv, hd, S = 8, 2, 32, 50
    q, K, V = torch.randn(H, hd), torch.randn(Hkv, S, hd), torch.randn(Hkv, S, hd)
    mask = torch.rand(S) < 0.6
    mask[3] = True
    want = F.scaled_dot_product_attention(q[None, :, None], K.repeat_interleave(4, 0)[None],
                                          V.repeat_interleave(4, 0)[None], attn_mask=mask[None, :])[0, :, 0]
    assert torch.allclose(decode_attention_ref(q, K, V, mask), want, atol=1e-5)


CODE = r'''
import torch
from specq.kernels import attention as DA
torch.manual_seed(0)
bad = []
# (H, Hkv, hd, S, mask): grouped 4 / 3 / 1 / 8 heads per KV head; a prefix mask leaving whole slices out; holes
for H, Hkv, hd, S, kind in [(8, 2, 64, 300, "holes"), (9, 3, 64, 128, "full"), (4, 4, 32, 64, "one"),
                            (16, 2, 128, 700, "prefix"), (16, 2, 128, 700, "holes")]:
    q = torch.randn(H, hd).to(torch.bfloat16)
    K = torch.randn(Hkv, S, hd).to(torch.bfloat16)
    V = torch.randn(Hkv, S, hd).to(torch.bfloat16)
    mask = torch.zeros(S, dtype=torch.bool)
    if kind == "holes":
        mask = torch.rand(S) < 0.7
    elif kind == "full":
        mask[:] = True
    elif kind == "one":
        mask[5] = True
    else:
        mask[:37] = True
    mask[0] = True
    if not DA.usable(q, K, mask):
        bad.append(("unusable", H, Hkv, hd))
        continue
    y = DA._run(q, K, V, mask)
    r = DA.decode_attention_ref(q, K, V, mask)
    e = ((y.float() - r.float()).norm() / r.float().norm()).item()
    if not (e < 1e-2 and bool(torch.isfinite(y).all())):
        bad.append((H, Hkv, hd, S, kind, e))
print("BAD", bad) if bad else print("ALLOK")
'''


def test_decode_attention_interpreted():
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from triton_interp import PATCH
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", PATCH + CODE], env=env, capture_output=True, text=True, timeout=300)
    assert "ALLOK" in r.stdout, r.stdout + r.stderr[-3000:]
