import copy

import pytest
import torch

from specq.errors import SpecqError
from specq.quant import pack as P
from specq.quant import quantize_model
from specq.quant.gptq import gptq, hessian_add
from specq.quant.quantize import _wq_gptq
from specq.quant.search import refit_scales, search_params

from test_quant_calib import logits, outlier_acts, tiny


def layer(K=256, N=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    W[:, 7] *= 6                                                   # a few large weights per row
    X = outlier_acts(K=K, seed=seed)
    return W, X, hessian_add(torch.zeros(K, K, dtype=torch.float64), X)


def group_err(W, Wq, H, G):
    d = (W - Wq).view(W.shape[0], -1, G)
    Hb = H.float().view(W.shape[1] // G, G, W.shape[1] // G, G)
    Hg = torch.stack([Hb[g, :, g] for g in range(W.shape[1] // G)])
    return torch.einsum("ngi,gij,ngj->ng", d, Hg, d)


@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_search_params_never_worse_per_group(bits, sym):
    W, X, H = layer()
    G = 64
    q, s, z = P.rtn(W, bits, G, sym)
    base = group_err(W, P.dequant(q, s, z), H, G)
    s2, z2 = search_params(W, bits, G, sym, H)
    assert torch.equal(z2, z2.round()) and (z2 >= 0).all() and (z2 <= 2 ** bits - 1).all()
    if sym:
        assert (z2 == 2 ** (bits - 1)).all()
    q2 = P.quant_codes(W.view(64, -1, G), s2, z2, bits).view_as(W)
    e = group_err(W, P.dequant(q2, s2, z2), H, G)
    assert (e <= base * (1 + 1e-5) + 1e-9).all()                   # the min/max range is a candidate
    assert e.sum() < 0.8 * base.sum()


def test_refit_scales_lowers_row_error_and_is_exact_for_own_codes():
    W, X, H = layer()
    q, s, z = gptq(W, H, 3, 64, sym=False)

    def row_err(sc):
        d = W - P.dequant(q, sc, z)
        return torch.einsum("nk,kl,nl->n", d.double(), H, d.double())
    s2 = refit_scales(W, H, q, z, s)
    assert (row_err(s2) <= row_err(s) * (1 + 1e-6)).all() and row_err(s2).sum() < row_err(s).sum()
    # a weight exactly on the grid with other scales: the refit recovers those scales
    s_true = s * (1 + 0.2 * torch.rand_like(s))
    s3 = refit_scales(P.dequant(q, s_true, z), H, q, z, s)
    torch.testing.assert_close(s3, s_true, rtol=1e-4, atol=1e-7)


def test_fp_target_equals_plain_gptq_when_inputs_agree():
    W, X, H = layer()
    lin = torch.nn.Linear(256, 64, bias=False)
    lin.weight.data.copy_(W)
    plain = _wq_gptq(lin, H, 4, 64, False, True, 0.01, "hessian", True)
    same = _wq_gptq(lin, H, 4, 64, False, True, 0.01, "hessian", True, C=H.clone())
    torch.testing.assert_close(same.dequantize(), plain.dequantize())
    # inputs that differ: the target moves towards W C H^-1 (the least-squares fit to the fp outputs)
    Xq = X + 0.3 * torch.randn_like(X)
    Hq = hessian_add(torch.zeros(256, 256, dtype=torch.float64), Xq)
    C = X.double().t() @ Xq.double()
    a = _wq_gptq(lin, Hq, 4, 64, False, True, 0.01, "hessian", True).dequantize()
    b = _wq_gptq(lin, Hq, 4, 64, False, True, 0.01, "hessian", True, C=C).dequantize()
    ref = X @ W.t()

    def err(Wq):
        return ((ref - Xq @ Wq.t()) ** 2).mean().item()
    assert err(b) < err(a)


def test_quantize_model_options_beat_plain_gptq():
    base = tiny()
    calib = torch.randint(0, 64, (8, 32))
    ids = torch.randint(0, 64, (48,))
    ref = logits(base, ids)
    err = {}
    for name, kw in (("plain", {}), ("best", dict(clip="hessian", true_seq=True, refit=True, fp_target=True))):
        m = quantize_model(copy.deepcopy(base), "w3a16", "gptq", group_size=32, sym=False, calib=calib,
                           progress=False, act_order=True, **kw)
        err[name] = ((logits(m, ids) - ref) ** 2).mean().item()
        assert m.quant_info["fp_target"] == bool(kw) and m.quant_info["clip"] == kw.get("clip")
    assert err["best"] < err["plain"], err
    m = quantize_model(copy.deepcopy(base), "w3a16", "gptq", group_size=32, calib=calib, progress=False, clip="mse")
    assert ((logits(m, ids) - ref) ** 2).mean().item() < 2 * err["plain"]
    with pytest.raises(SpecqError, match="clip"):
        quantize_model(copy.deepcopy(base), "w4a16", "gptq", calib=calib, group_size=32, clip="bogus")
