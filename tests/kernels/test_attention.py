"""Decode attention kernel (specq.kernels.attention) under TRITON_INTERPRET=1 against the torch reference, and
the reference against torch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

from specq.kernels.attention import decode_attention_ref



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
# (H, Hkv, hd, S, M, mask): grouped 4 / 3 / 1 / 8 heads per KV head; a prefix mask leaving whole slices out;
# holes; M > 1 with a tree block (each token sees the context and a random set of block slots incl. itself),
# rows spanning several row tiles (8 * 5 = 40 rows: tiles of 64; 4 * 9 = 36)
cases = [(8, 2, 64, 300, 1, "holes"), (9, 3, 64, 128, 1, "full"), (4, 4, 32, 64, 1, "one"),
         (16, 2, 128, 700, 1, "prefix"), (16, 2, 128, 700, 1, "holes"), (8, 2, 64, 300, 3, "tree"),
         (16, 2, 64, 260, 5, "tree"), (8, 2, 32, 200, 9, "tree"), (4, 4, 32, 130, 2, "tree")]
for H, Hkv, hd, S, M, kind in cases:
    q = torch.randn(H, M, hd).to(torch.bfloat16)
    K = torch.randn(Hkv, S, hd).to(torch.bfloat16)
    V = torch.randn(Hkv, S, hd).to(torch.bfloat16)
    mask = torch.zeros(M, S, dtype=torch.bool)
    if kind == "holes":
        mask[:] = torch.rand(S) < 0.7
    elif kind == "full":
        mask[:] = True
    elif kind == "one":
        mask[:, 5] = True
    elif kind == "prefix":
        mask[:, :37] = True
    else:
        L = 70
        mask[:, :L] = True
        mask[:, L:L + M] = (torch.rand(M, M) < 0.5) | torch.eye(M, dtype=torch.bool)
    mask[:, 0] = True
    if not DA.usable(q, K, mask):
        bad.append(("unusable", H, Hkv, hd, M))
        continue
    y = DA._run(q, K, V, mask)
    r = DA.attention_ref(q, K, V, mask)
    e = ((y.float() - r.float()).norm() / r.float().norm()).item()
    if not (e < 1e-2 and bool(torch.isfinite(y).all())):
        bad.append((H, Hkv, hd, S, M, kind, e))
    if M > 1:   # every token row equals the one-token kernel with that row's mask
        for m in range(M):
            y1 = DA.decode_attention(q[:, m].contiguous(), K, V, mask[m].contiguous())
            e1 = ((y1.float() - y[:, m].float()).norm() / y1.float().norm()).item()
            if e1 > 1e-2:
                bad.append(("row", H, M, m, e1))
print("BAD", bad) if bad else print("ALLOK")
'''


def test_decode_attention_interpreted():
    pytest.importorskip("triton")
    from tests.triton_interp import run_interpreted
    out = run_interpreted(CODE)
    assert "ALLOK" in out, out
