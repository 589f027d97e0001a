"""One-launch decode attention (specq.kernels.decode_attn): the reference equals rope + cache write + attention,
the Triton kernel (TRITON_INTERPRET=1) equals the reference and writes the cache exactly as the rope kernel does,
and the mutating custom op works under torch.compile."""

import pytest
import torch

from specq.kernels import decode_attn as DE
from specq.kernels.attention import attention_ref
from specq.models.llama import KVCache, rotate


def _inputs(nh, nkv, hd, S, slot, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, (nh + 2 * nkv) * hd, generator=g).to(dtype)
    ang = torch.rand(1, hd // 2, generator=g) * 6
    emb = torch.cat((ang, ang), -1)
    mask = torch.zeros(1, S, dtype=torch.bool)
    mask[0, :slot + 1] = True
    mask[0, torch.randint(0, slot + 1, (slot // 3,), generator=g)] = False
    mask[0, slot] = True
    kc, vc = torch.randn(nkv, S, hd, generator=g).to(dtype), torch.randn(nkv, S, hd, generator=g).to(dtype)
    return qkv, emb.cos().to(dtype), emb.sin().to(dtype), torch.tensor([slot]), kc, vc, mask


def test_reference_is_rope_update_attention():
    nh, nkv, hd, S, slot = 4, 2, 16, 12, 7
    qkv, cos, sin, slots, kc, vc, mask = _inputs(nh, nkv, hd, S, slot)
    cache = KVCache(nkv, S, hd, torch.float32, "cpu")
    cache.k.copy_(kc)
    cache.v.copy_(vc)
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
    K, V = cache.update(slots, rotate(k.reshape(1, nkv, hd).transpose(0, 1), cos, sin), v.reshape(1, nkv, hd).transpose(0, 1))
    want = attention_ref(rotate(q.reshape(1, nh, hd).transpose(0, 1), cos, sin), K, V, mask).transpose(0, 1).reshape(1, -1)
    got = DE.decode_attention_ref(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, K, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc, V, rtol=0, atol=0)


@torch.no_grad()
def test_custom_op_under_compile_mutates_the_cache():
    nh, nkv, hd, S, slot = 4, 2, 16, 10, 5
    qkv, cos, sin, slots, kc0, vc0, mask = _inputs(nh, nkv, hd, S, slot, seed=1)
    kc, vc = kc0.clone(), vc0.clone()
    want = DE.decode_attention_ref(qkv, cos, sin, slots, kc0, vc0, mask, nh, nkv)
    f = torch.compile(lambda a, b, c, d, m: torch.ops.specq.decode_attn(a, b, c, d, kc, vc, m, nh, nkv) * 2,
                      fullgraph=True)
    torch.testing.assert_close(f(qkv, cos, sin, slots, mask), want * 2)
    torch.testing.assert_close(kc, kc0, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc0, rtol=0, atol=0)
    torch._dynamo.reset()


CODE = r'''
import torch
from specq.kernels import decode_attn as DE, rope as RC
from tests.kernels.test_decode_attn import _inputs
bad = []
cases = [(8, 2, 64, 300, 200, 4, torch.bfloat16), (4, 4, 32, 64, 0, 2, torch.bfloat16),
         (32, 8, 128, 256, 130, 2, torch.bfloat16), (6, 2, 16, 80, 79, 8, torch.float16)]
for (nh, nkv, hd, S, slot, nsp, dt) in cases:
    for nsl in (nsp, 1):                     # several slices and a merge; one slice holding every key
        DE._nsp = lambda Hkv, dev, n=nsl: n
        qkv, cos, sin, slots, kc, vc, mask = _inputs(nh, nkv, hd, S, slot, seed=slot, dtype=dt)
        kr, vr = kc.clone(), vc.clone()      # the cache as the reference writes it
        kk, vk = kc.clone(), vc.clone()      # ... and as the rope kernel writes it
        RC._run(qkv, cos, sin, slots, kk, vk, nh, nkv)
        assert DE.usable(qkv, kc, vc, mask)
        yr = DE.decode_attention_ref(qkv, cos, sin, slots, kr, vr, mask, nh, nkv)
        for it in range(2):                  # twice: the second call finds its own token in the cache
            y = DE._run(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)
            e = ((y.float() - yr.float()).norm() / yr.float().norm()).item()
            if e > 1.5e-2 or not torch.isfinite(y).all() or not torch.equal(kc, kk) or not torch.equal(vc, vr):
                bad.append((nh, slot, nsl, it, e, torch.equal(kc, kk), torch.equal(vc, vr)))
        mask[0, slot + 1:] = True            # past the token's slot: not read (the kernel's contract)
        if not torch.equal(DE._run(qkv, cos, sin, slots, kc, vc, mask, nh, nkv), y):
            bad.append(("past-slot", nh, slot, nsl))
print("BAD", bad) if bad else print("ALLOK")
'''


def test_decode_kernel_interpreted():
    pytest.importorskip("triton")
    from tests.triton_interp import run_interpreted
    out = run_interpreted(CODE)
    assert "ALLOK" in out, out
