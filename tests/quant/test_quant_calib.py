import copy

import torch

from specq.models.config import ModelConfig
from specq.models.llama import Transformer, causal_mask
from specq.quant import pack as P
from specq.quant import quantize_model
from specq.quant.awq import fake_quant, search_clip, search_scale
from specq.quant.calib import LINEARS, fold, get
from specq.quant.gptq import gptq, hessian_add


def outlier_acts(T=1024, K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, 16, generator=g) @ torch.randn(16, K, generator=g) / 4      # correlated channels
    X = X + 0.3 * torch.randn(T, K, generator=g)
    X[:, :6] *= 25.0                                                                 # outlier channels
    return X


def out_err(W, Wq, X):
    return ((X @ W.t() - X @ Wq.t()) ** 2).mean().item()


def test_gptq_and_awq_beat_rtn_on_layer_output():
    torch.manual_seed(0)
    K, N, bits, gs = 256, 96, 3, 128
    W = torch.randn(N, K) / K ** 0.5
    X = outlier_acts(K=K)
    Xc, Xt = X[:768], X[768:]                                   # calibrate / test on disjoint tokens
    rtn = fake_quant(W, bits, gs, False)
    q, s, z = gptq(W, hessian_add(torch.zeros(K, K, dtype=torch.float64), Xc), bits, gs, sym=False)
    W_gptq = P.dequant(q, s, z)
    q, s, z = gptq(W, hessian_add(torch.zeros(K, K, dtype=torch.float64), Xc), bits, gs, sym=False, act_order=True)
    W_ao = P.dequant(q, s, z)
    sc = search_scale(W, Xc, bits, gs, False)
    clip = search_clip(W * sc, Xc / sc, bits, gs, False)
    W_awq = fake_quant(W * sc, bits, gs, False, clip) / sc
    e = {k: out_err(W, v, Xt) for k, v in dict(rtn=rtn, gptq=W_gptq, act_order=W_ao, awq=W_awq).items()}
    assert e["gptq"] < 0.8 * e["rtn"], e
    assert e["act_order"] < 0.8 * e["rtn"], e
    assert e["awq"] < 0.9 * e["rtn"], e


def tiny(nh=4, nkv=4, bias=False):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=nh,
                      num_kv_heads=nkv, attention_bias=bias, arch="qwen2" if bias else "llama")
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in m.layers:                    # realistic outlier channels in the normed inputs
            layer.input_layernorm.weight[:3] = 20.0
            layer.post_attention_layernorm.weight[5:7] = 15.0
            if bias:
                layer.self_attn.qkv_proj.bias.normal_()
    return m


def logits(m, ids):
    m.setup_cache(ids.numel())
    p = torch.arange(ids.numel())
    with torch.no_grad():
        return m(ids, p, p, causal_mask(0, ids.numel(), ids.numel()))[0]


def test_fold_preserves_function():
    for nkv, bias in ((4, True), (2, False)):
        m = tiny(nkv=nkv, bias=bias)
        ids = torch.randint(0, 64, (10,))
        ref = logits(m, ids)
        for layer in m.layers:
            for nm in LINEARS:
                if nm == "self_attn.o_proj" and nkv != 4:
                    continue
                K = get(layer, nm).in_features
                fold(layer, m.cfg, nm, torch.rand(K) * 3 + 0.2)
        torch.testing.assert_close(logits(m, ids), ref, rtol=1e-4, atol=1e-4)


def test_calibrated_methods_beat_rtn_on_model():
    base = tiny()
    calib = torch.randint(0, 64, (8, 32))
    ids = torch.randint(0, 64, (48,))
    ref = logits(base, ids)
    err = {}
    for method in ("rtn", "gptq", "awq"):
        m = quantize_model(copy.deepcopy(base), "w3a16", method, group_size=32, sym=False, calib=calib, progress=False)
        err[method] = ((logits(m, ids) - ref) ** 2).mean().item()
    assert err["gptq"] < err["rtn"] and err["awq"] < err["rtn"], err
    for fmt, method in (("w8a8", "smoothquant"), ("w4a8", "gptq")):
        m = quantize_model(copy.deepcopy(base), fmt, method, group_size=32, calib=calib, progress=False)
        e = ((logits(m, ids) - ref) ** 2).mean().item()
        assert e < err["rtn"], (fmt, e, err)


class _Tok:
    def encode(self, text):
        return [ord(c) % 64 for c in text]


def test_calib_sources(tmp_path):
    import importlib.util

    import pytest

    from specq.errors import SpecqError
    from specq.quant.calib import calib_text, calib_tokens
    f = tmp_path / "c.txt"
    f.write_text("hello calibration world " * 20)
    t = calib_tokens(_Tok(), str(f), n=3, seqlen=16)
    assert t.shape == (3, 16) and torch.equal(t, calib_tokens(_Tok(), str(f), n=3, seqlen=16))
    with pytest.raises(SpecqError, match="too short"):
        calib_tokens(_Tok(), str(f), n=1, seqlen=10_000)
    with pytest.raises(SpecqError, match="calibration source"):
        calib_text(str(tmp_path / "nope.txt"))
    if not (importlib.util.find_spec("pandas") or importlib.util.find_spec("pyarrow")):
        with pytest.raises(SpecqError, match="pyarrow"):
            calib_text("gsm8k")
