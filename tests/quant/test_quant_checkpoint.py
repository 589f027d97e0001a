import json

import pytest
import torch
from safetensors.torch import save_file

from specq.errors import SpecqError
from specq.models.config import ModelConfig
from specq.models.llama import Transformer, causal_mask
from specq.quant import WQLinear, quantize_model
from specq.quant.checkpoint import awq_unpack, fuse_wq, gptq_unpack, load_hf_quantized, load_quantized, save_quantized

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def to_i32(words):  # python ints 0..2^32-1 -> int32 tensor
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


def gptq_pack(codes, zeros, v1=True):
    """Independent AutoGPTQ layout: qweight [K//8, N] packed along K; qzeros [ng, N//8] (v1: zero - 1)."""
    N, K = codes.shape
    qw = [[sum(int(codes[n, 8 * r + j]) << (4 * j) for j in range(8)) for n in range(N)] for r in range(K // 8)]
    zz = zeros - (1 if v1 else 0)
    qz = [[sum(int(zz[g, 8 * c + j]) << (4 * j) for j in range(8)) for c in range(N // 8)] for g in range(zeros.shape[0])]
    return to_i32(qw), to_i32(qz)


def awq_pack(codes, zeros):
    """Independent AWQ GEMM layout: qweight [K, N//8], nibble i holds column 8c + AWQ_ORDER[i]."""
    N, K = codes.shape
    qw = [[sum(int(codes[8 * c + AWQ_ORDER[i], k]) << (4 * i) for i in range(8)) for c in range(N // 8)] for k in range(K)]
    qz = [[sum(int(zeros[g, 8 * c + AWQ_ORDER[i]]) << (4 * i) for i in range(8)) for c in range(N // 8)]
          for g in range(zeros.shape[0])]
    return to_i32(qw), to_i32(qz)


def known(N, K, G, sym, g_idx=None):
    """Known codes [N, K], zeros [ng, N] (1..15; v1 cannot store 0), fp16 scales [ng, N] and W."""
    ng = K // G
    codes = torch.randint(0, 16, (N, K))
    zeros = torch.full((ng, N), 8) if sym else torch.randint(1, 16, (ng, N))
    scales = (torch.rand(ng, N) * 0.02 + 0.001).half()
    g = torch.arange(K) // G if g_idx is None else g_idx
    W = (codes.float() - zeros.float()[g].t()) * scales.float()[g].t()
    return codes, zeros, scales, g, W


def act_order_gidx(K, G):
    perm = torch.randperm(K)
    g = torch.empty(K, dtype=torch.long)
    g[perm] = torch.arange(K) // G
    return g.int()


@pytest.mark.parametrize("sym,act", [(True, False), (False, False), (True, True), (False, True)])
def test_gptq_import_exact(sym, act):
    K, G = 64, 32
    parts, ref = [], []
    g_idx = act_order_gidx(K, G) if act else None
    for N in (32, 16, 16):                                   # q, k, v
        codes, zeros, scales, g, W = known(N, K, G, sym, g_idx)
        qw, qz = gptq_pack(codes, zeros)
        parts.append(gptq_unpack(qw, qz, scales, g.int()))
        ref.append(W)
    m = fuse_wq(parts, G, sym)
    assert (m.perm is not None) == act
    assert torch.equal(m.dequantize(), torch.cat(ref))
    x = torch.randn(3, K)
    torch.testing.assert_close(m(x), x @ torch.cat(ref).t(), rtol=1e-5, atol=1e-5)


def test_awq_import_exact():
    K, G = 64, 32
    parts, ref = [], []
    for N in (48, 48):                                        # gate, up
        codes, zeros, scales, g, W = known(N, K, G, False)
        qw, qz = awq_pack(codes, zeros)
        assert qw.shape == (K, N // 8) and qz.shape == (K // G, N // 8)
        parts.append(awq_unpack(qw, qz, scales))
        ref.append(W)
    assert torch.equal(fuse_wq(parts, G, False).dequantize(), torch.cat(ref))


@pytest.mark.parametrize("method,act", [("gptq", False), ("gptq", True), ("awq", False)])
def test_hf_directory_import(tmp_path, method, act):
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
          "quantization_config": {"quant_method": method, "bits": 4, "group_size": 32, "sym": False,
                                  "desc_act": False, "version": "gemm", "zero_point": True}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    sd = {"model.embed_tokens.weight": torch.randn(64, 64).half(), "model.norm.weight": torch.rand(64).half(),
          "lm_head.weight": torch.randn(64, 64).half(), "model.layers.0.input_layernorm.weight": torch.rand(64).half(),
          "model.layers.0.post_attention_layernorm.weight": torch.rand(64).half()}
    refs = {}
    gid = {K: act_order_gidx(K, 32) if act else None for K in (64, 96)}   # shared by Linears of one input
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64), "mlp.down_proj": (64, 96)}
    for name, (N, K) in shapes.items():
        codes, zeros, scales, g, W = known(N, K, 32, False, gid[K] if name != "self_attn.o_proj" else None)
        pre = f"model.layers.0.{name}."
        if method == "gptq":
            qw, qz = gptq_pack(codes, zeros)
            sd[pre + "g_idx"] = g.int().clone()
        else:
            qw, qz = awq_pack(codes, zeros)
        sd[pre + "qweight"], sd[pre + "qzeros"], sd[pre + "scales"] = qw, qz, scales
        refs[name] = W
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = load_hf_quantized(tmp_path)
    layer = model.layers[0]
    assert torch.equal(layer.self_attn.qkv_proj.dequantize(),
                       torch.cat([refs["self_attn.q_proj"], refs["self_attn.k_proj"], refs["self_attn.v_proj"]]))
    assert torch.equal(layer.mlp.gate_up_proj.dequantize(), torch.cat([refs["mlp.gate_proj"], refs["mlp.up_proj"]]))
    assert torch.equal(layer.mlp.down_proj.dequantize(), refs["mlp.down_proj"])
    assert torch.equal(layer.self_attn.o_proj.dequantize(), refs["self_attn.o_proj"])
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].float())
    assert (layer.self_attn.qkv_proj.perm is not None) == act
    save_quantized(model, tmp_path / "specq")                 # imported model -> specq checkpoint -> back
    m2, _ = load_quantized(tmp_path / "specq")
    assert torch.equal(m2.layers[0].self_attn.qkv_proj.dequantize(), layer.self_attn.qkv_proj.dequantize())
    assert torch.equal(m2.layers[0].mlp.gate_up_proj.dequantize(), layer.mlp.gate_up_proj.dequantize())


def tiny():
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    return Transformer(cfg).eval()


def logits(m, ids):
    m.setup_cache(ids.numel())
    p = torch.arange(ids.numel())
    with torch.no_grad():
        return m(ids, p, p, causal_mask(0, ids.numel(), ids.numel()))[0]


@pytest.mark.parametrize("fmt,method,gs", [("w4a16", "rtn", 32), ("w3a16", "rtn", -1), ("w8a8", "rtn", -1), ("w4a8", "rtn", 32)])
def test_save_load_roundtrip(tmp_path, fmt, method, gs):
    m = quantize_model(tiny(), fmt, method, group_size=gs, progress=False)
    ids = torch.randint(0, 64, (9,))
    save_quantized(m, tmp_path / "q")
    m2, tok = load_quantized(tmp_path / "q")
    assert tok is None and m2.quant_info["format"] == fmt
    assert torch.equal(logits(m2, ids), logits(m, ids))


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_quantized_lm_head(tmp_path, tie):
    """A quantized lm_head round-trips (tied config: quantized head + full-precision embedding, untied)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=tie)
    m = quantize_model(Transformer(cfg).eval(), "w4a16", "rtn", group_size=32, progress=False, lm_head=True)
    ids = torch.randint(0, 64, (9,))
    d = save_quantized(m, tmp_path / "q")
    assert json.loads((d / "config.json").read_text())["quantization"]["lm_head"] is True
    m2, _ = load_quantized(d)
    assert isinstance(m2.lm_head, WQLinear) and m2.quant_info["lm_head"] is True
    assert isinstance(m2.embed_tokens, torch.nn.Embedding) and m2.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(m2.embed_tokens.weight, m.embed_tokens.weight)
    assert torch.equal(m2.lm_head.qweight, m.lm_head.qweight) and torch.equal(m2.lm_head.scales, m.lm_head.scales)
    assert torch.equal(logits(m2, ids), logits(m, ids))
    m3, _ = load_quantized(save_quantized(quantize_model(Transformer(cfg).eval(), "w4a16", "rtn", group_size=32,
                                                         progress=False), tmp_path / "off"))
    assert isinstance(m3.lm_head, torch.nn.Linear) and m3.quant_info["lm_head"] is False
    if tie:
        assert m3.lm_head.weight is m3.embed_tokens.weight


def test_corrupt_checkpoint_raises(tmp_path):
    m = quantize_model(tiny(), "w4a16", "rtn", group_size=32, progress=False)
    d = save_quantized(m, tmp_path / "q")
    st = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(st[: len(st) // 2])
    with pytest.raises(SpecqError, match="corrupt"):
        load_quantized(d)
    d = save_quantized(m, tmp_path / "q2")
    conf = json.loads((d / "config.json").read_text())
    conf["quantization"]["group_size"] = 64                   # disagrees with the stored scales
    conf["quantization"]["group_sizes"] = {}
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(SpecqError, match="corrupt"):
        load_quantized(d)
    conf["quantization"]["bits"] = 7
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(SpecqError):
        load_quantized(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(SpecqError, match="corrupt"):
        load_quantized(d)
    with pytest.raises(SpecqError):
        load_quantized(tmp_path / "missing")
