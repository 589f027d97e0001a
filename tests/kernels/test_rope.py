"""Rope + KV-cache write kernel (specq.kernels.rope): the reference equals the model's rotate / cache update, the
Triton kernel (TRITON_INTERPRET=1) equals the reference, and the mutating custom op works under torch.compile."""

import pytest
import torch

from specq.kernels import rope as RC
from specq.models.llama import KVCache, rotate



def _inputs(M, nh, nkv, hd, S, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(M, (nh + 2 * nkv) * hd, generator=g).to(dtype)
    ang = torch.rand(M, hd // 2, generator=g) * 6
    emb = torch.cat((ang, ang), -1)
    slots = torch.randperm(S, generator=g)[:M]
    return qkv, emb.cos().to(dtype), emb.sin().to(dtype), slots


def test_reference_matches_model_rotate_and_update():
    M, nh, nkv, hd, S = 3, 4, 2, 16, 10
    qkv, cos, sin, slots = _inputs(M, nh, nkv, hd, S)
    cache = KVCache(nkv, S, hd, torch.float32, "cpu")
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
    want_q = rotate(q.reshape(M, nh, hd).transpose(0, 1), cos, sin)
    want_k, want_v = cache.update(slots, rotate(k.reshape(M, nkv, hd).transpose(0, 1), cos, sin),
                                  v.reshape(M, nkv, hd).transpose(0, 1))
    kc, vc = torch.zeros(nkv, S, hd), torch.zeros(nkv, S, hd)
    got_q = RC.rope_cache_ref(qkv, cos, sin, slots, kc, vc, nh, nkv)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc, want_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc, want_v, rtol=0, atol=0)
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots] = False
    assert kc[:, untouched].abs().sum() == 0 and vc[:, untouched].abs().sum() == 0


@torch.no_grad()
def test_custom_op_under_compile_mutates_the_cache():
    M, nh, nkv, hd, S = 2, 4, 2, 16, 8
    qkv, cos, sin, slots = _inputs(M, nh, nkv, hd, S, seed=1)
    kc0, vc0 = torch.zeros(nkv, S, hd), torch.zeros(nkv, S, hd)
    want = RC.rope_cache_ref(qkv, cos, sin, slots, kc0, vc0, nh, nkv)
    kc, vc = torch.zeros(nkv, S, hd), torch.zeros(nkv, S, hd)
    f = torch.compile(lambda a, b, c, d: torch.ops.specq.rope_cache(a, b, c, d, kc, vc, nh, nkv) * 2, fullgraph=True)
    got = f(qkv, cos, sin, slots)
    torch.testing.assert_close(got, want * 2)
    torch.testing.assert_close(kc, kc0, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc0, rtol=0, atol=0)
    torch._dynamo.reset()


CODE = r'''
import torch
from specq.kernels import rope as RC
bad = []
for (M, nh, nkv, hd, S) in [(1, 8, 2, 64, 40), (3, 4, 4, 32, 16), (5, 32, 8, 128, 64)]:
    g = torch.Generator().manual_seed(M)
    qkv = torch.randn(M, (nh + 2 * nkv) * hd, generator=g).to(torch.bfloat16)
    ang = torch.rand(M, hd // 2, generator=g) * 6
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    slots = torch.randperm(S, generator=g)[:M]
    kc, vc = torch.randn(nkv, S, hd).to(torch.bfloat16), torch.randn(nkv, S, hd).to(torch.bfloat16)
    kr, vr = kc.clone(), vc.clone()
    assert RC.usable(qkv, kc, vc)
    q = RC._run(qkv, cos, sin, slots, kc, vc, nh, nkv)
    qr = RC.rope_cache_ref(qkv, cos, sin, slots, kr, vr, nh, nkv)
    for name, a, b in (("q", q, qr), ("k", kc, kr), ("v", vc, vr)):
        d = ((a.float() - b.float()).norm() / b.float().norm()).item()   # rounding order: a 16-bit ulp here and there
        if d > 1e-2:
            bad.append((M, nh, name, d))
print("BAD", bad) if bad else print("ALLOK")
'''


def test_rope_kernel_interpreted():
    pytest.importorskip("triton")
    from tests.triton_interp import run_interpreted
    out = run_interpreted(CODE)
    assert "ALLOK" in out, out
