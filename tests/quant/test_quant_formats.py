import pytest
import torch

from specq.errors import SpecqError
from specq.models.config import ModelConfig
from specq.models.llama import Transformer, causal_mask
from specq.quant import Int8KVCache, W4A8Linear, W8A8Linear, WQLinear, quantize_model, weight_bytes
from specq.quant import pack as P
from specq.quant.w8a8 import quant_act


def bitstream(row_words, bits, K):
    """Independent reading of the documented layout: code k = bits b*k.. of the row's word stream."""
    s = 0
    for i, w in enumerate(row_words):
        s |= (int(w) & 0xFFFFFFFF) << (32 * i)
    return [(s >> (bits * k)) & ((1 << bits) - 1) for k in range(K)]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip_and_layout(bits):
    q = torch.randint(0, 1 << bits, (5, 96), dtype=torch.uint8)
    w = P.pack(q, bits)
    assert w.dtype == torch.int32 and w.shape == (5, 96 * bits // 32)
    assert torch.equal(P.unpack(w, bits, 96), q)
    for n in range(5):
        assert bitstream(w[n].tolist(), bits, 96) == q[n].tolist()


def test_canonical_4bit_nibbles():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    w = P.pack(q, 4)
    for n in range(3):
        for wi in range(8):
            for j in range(8):
                assert (int(w[n, wi]) >> (4 * j)) & 0xF == int(q[n, 8 * wi + j])


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (4, 128, False), (3, 64, True), (3, -1, False), (2, 32, False)])
def test_wq_forward_equals_dequant_matmul(bits, gs, sym):
    lin = torch.nn.Linear(128, 48, bias=True)
    m = WQLinear.from_linear(lin, bits, gs, sym)
    G = 128 if gs == -1 else gs
    assert m.scales.shape == (48, 128 // G) and m.zeros.shape == (48, 128 // G)
    if sym:
        assert torch.all(m.zeros == 2 ** (bits - 1))
    W = m.dequantize()
    q = m.codes().float()
    ref = (q.view(48, -1, G) - m.zeros[..., None]) * m.scales[..., None]
    assert torch.equal(W, ref.view(48, 128))
    x = torch.randn(7, 128)
    torch.testing.assert_close(m(x), x @ W.t() + lin.bias, rtol=0, atol=1e-5)
    err = (W - lin.weight).abs().max() / lin.weight.abs().max()
    assert err < {4: 0.15, 3: 0.3, 2: 0.7}[bits]


def test_w8a8_and_w4a8_forward_equal_fake_quant():
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 64, bias=False)
    x = torch.randn(5, 256) * 3
    xq, sx = quant_act(x)
    for m in (W8A8Linear.from_linear(lin), W4A8Linear.from_linear(lin, -1), W4A8Linear.from_linear(lin, 128)):
        wi = m.int_weight()
        assert torch.equal(wi, wi.round()) and wi.abs().max() <= 128
        ref = (xq * sx) @ m.dequantize().t()
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-4)
    g = W4A8Linear.from_linear(lin, 128)
    assert g.gscale.dtype == torch.int8 and g.gscale.min() >= 1 and g.gscale.max() <= 16
    e8 = (W8A8Linear.from_linear(lin).dequantize() - lin.weight).abs().max()
    e4 = (W4A8Linear.from_linear(lin, -1).dequantize() - lin.weight).abs().max()
    assert e8 < e4


def tiny(nkv=2, layers=2, K=64):
    cfg = ModelConfig(vocab_size=96, hidden_size=K, intermediate_size=128, num_layers=layers, num_heads=4, num_kv_heads=nkv)
    return Transformer(cfg).eval()


def test_int8_kv_cache_close_to_fp():
    model = tiny()
    ids = torch.randint(0, 96, (12,))
    pos = torch.arange(12)
    outs = []
    for cls in (None, Int8KVCache):
        model.setup_cache(16, **({} if cls is None else {"cache_cls": cls}))
        with torch.no_grad():
            outs.append(model(ids, pos, pos, causal_mask(0, 12, 16))[0])
    assert isinstance(model.layers[0].self_attn.cache, Int8KVCache)
    assert model.layers[0].self_attn.cache.k.dtype == torch.int8
    d = (outs[0] - outs[1]).abs().max() / outs[0].abs().max()
    assert 0 < d < 0.02
    c = model.layers[0].self_attn.cache
    c.move(torch.tensor([3, 4]), torch.tensor([0, 1]))
    assert torch.equal(c.k[:, 0], c.k[:, 3]) and torch.equal(c.k_scale[:, 1], c.k_scale[:, 4])


def test_quantize_model_swaps_and_bytes():
    model = tiny(K=128)
    x = torch.randint(0, 96, (6,))
    quantize_model(model, "w4a16", "rtn", group_size=128, progress=False)
    for layer in model.layers:
        assert isinstance(layer.self_attn.qkv_proj, WQLinear) and isinstance(layer.mlp.down_proj, WQLinear)
    assert isinstance(model.lm_head, torch.nn.Linear)
    wb = weight_bytes(model)
    assert 3.5 < wb["ratio_vs_bf16"] < 4.0
    model.setup_cache(8)
    logits = model(x, torch.arange(6), torch.arange(6), causal_mask(0, 6, 8))[0]
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_lm_head(tie):
    """lm_head=True: the head becomes an RTN WQLinear [K=D, N=V] (untied), the embedding keeps its fp weight."""
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=tie)
    model = Transformer(cfg).eval()
    emb, W = model.embed_tokens.weight, model.lm_head.weight.detach().clone()
    E = emb.detach().clone()
    quantize_model(model, "w4a16", "gptq", group_size=32, progress=False, calib=torch.randint(0, 96, (2, 16)),
                   lm_head=True)
    head = model.lm_head
    assert isinstance(head, WQLinear) and (head.in_features, head.out_features, head.bits) == (64, 96, 4)
    assert model.embed_tokens.weight is emb and torch.equal(emb, E) and emb.dtype == torch.float32
    assert model.quant_info["lm_head"] is True and model.quant_info["group_sizes"]["lm_head"] == 32
    assert torch.equal(head.dequantize(), WQLinear.from_linear(_lin(W), 4, 32, True).dequantize())  # RTN, not GPTQ
    ids = torch.randint(0, 96, (6,))
    model.setup_cache(8)
    with torch.no_grad():
        logits, h = model(ids, torch.arange(6), torch.arange(6), causal_mask(0, 6, 8))
    want = h @ head.dequantize().t()                     # lm_head weight = the WQLinear's dequantize()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert (logits - h @ W.t()).abs().max() > 1e-4       # the head really is quantized
    assert (logits - h @ W.t()).abs().max() < 0.2 * (h @ W.t()).abs().max()


def _lin(W):
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    return lin


def test_quantize_lm_head_needs_weight_only():
    for fmt in ("w8a8", "w4a8"):
        m = tiny()
        with pytest.raises(SpecqError, match="weight-only"):
            quantize_model(m, fmt, "rtn", group_size=-1, progress=False, lm_head=True)
        assert isinstance(m.lm_head, torch.nn.Linear) and isinstance(m.layers[0].mlp.down_proj, torch.nn.Linear)
    m = quantize_model(tiny(), "w8a8", "rtn", progress=False)       # off: unchanged behaviour
    assert isinstance(m.lm_head, torch.nn.Linear) and m.quant_info["lm_head"] is False


def test_bad_input_errors():
    with pytest.raises(SpecqError, match="bits"):
        WQLinear(64, 8, bits=5)
    with pytest.raises(SpecqError, match="group size"):
        WQLinear(64, 8, bits=4, group_size=48)
    with pytest.raises(SpecqError, match="does not divide"):
        WQLinear(96, 8, bits=4, group_size=64)
    with pytest.raises(SpecqError, match="does not divide"):
        quantize_model(tiny(K=96), "w4a16", "rtn", group_size=64, progress=False)
    m = quantize_model(tiny(K=96), "w4a16", "rtn", group_size=64, progress=False, fit_group=True)
    assert m.layers[0].self_attn.qkv_proj.group_size == 32
    with pytest.raises(SpecqError, match="unknown format"):
        quantize_model(tiny(), "w5a16", "rtn", progress=False)
    with pytest.raises(SpecqError, match="contradicts"):
        quantize_model(tiny(), "w4a16", "rtn", bits=3, progress=False)
    with pytest.raises(SpecqError, match="calibration"):
        quantize_model(tiny(), "w4a16", "gptq", group_size=32, progress=False)
    with pytest.raises(SpecqError, match="not available"):
        quantize_model(tiny(), "w8a8", "awq", progress=False)
