"""Quantized checkpoints.

specq format (a directory): model.safetensors (state dict; a tied lm_head is not duplicated) and
config.json = ModelConfig fields + "quantization": {format, method, bits, group_size, sym, act_order,
alpha, dtype, perm_modules, lm_head, compensate}. compensate (`specq quantize --compensate`): the spec and selector
of the dynamic error compensation whose residuals are in residual.safetensors (specq.compensate.store). lm_head true: the head is a WQLinear (lm_head.qweight / scales /
zeros), stored even when tie_word_embeddings (the embedding stays full precision, untied). load_quantized() validates everything and raises SpecqError on any
mismatch (missing/extra tensors, wrong shapes or dtypes, non-finite scales, codes out of range).

Hugging Face imports (4-bit, as published):
  GPTQ (AutoGPTQ / GPTQModel): qweight int32 [K//8, N], nibble j of word [r, n] = code of input k=8r+j;
       qzeros int32 [K//G, N//8], nibble j of word [g, c] = zero of output n=8c+j, stored minus 1 in
       the v1 format ("gptq", the default) and as is in "gptq_v2"; scales fp16 [K//G, N]; g_idx [K]
       group of each input channel (act-order checkpoints: not k//G -> a `perm` buffer in WQLinear).
  AWQ GEMM: qweight int32 [K, N//8], qzeros int32 [K//G, N//8]: nibble i of word c holds output
       n = 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales fp16 [K//G, N]; W = (q - z) * s.
q/k/v and gate/up are fused along N into the specq qkv_proj / gate_up_proj layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SpecqError
from ..models.config import ModelConfig
from ..models.llama import Transformer
from .calib import LINEARS, get, set_
from .w8a8 import W4A8Linear, W8A8Linear
from .wq import WQLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _dtype_name(dt):
    return str(dt).replace("torch.", "")


def empty_module(q: dict, name, K, N, bias, dtype, perm=False):
    fmt = q["format"]
    gs = (q.get("group_sizes") or {}).get(name, q["group_size"])
    if fmt.endswith("a16"):
        return WQLinear(K, N, q["bits"], gs, q["sym"], bias, dtype, perm=perm)
    if fmt == "w8a8":
        return W8A8Linear(K, N, bias, dtype)
    return W4A8Linear(K, N, gs, bias, dtype)


def save_quantized(model, out_dir, tokenizer=None, extra: dict | None = None):
    """Write a specq quantized directory (weights, config with a "quantization" section, tokenizer)."""
    from safetensors.torch import save_file
    q = getattr(model, "quant_info", None)
    if not q:
        raise SpecqError("model is not quantized (run quantize_model first)")
    from ..compensate import store
    from ..compensate.linear import compensated_modules
    comp = compensated_modules(model)
    if comp and not isinstance(q.get("compensate"), dict):
        raise SpecqError("compensated model without its spec in quant_info['compensate']")
    residuals = store.tensors_of(model) if comp else None    # before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped = tuple(f"{nm}.base." for nm, _ in comp)          # CompensatedLinear: its quantized Linear's own names
    sd = {}
    for k, v in model.state_dict().items():
        pre = next((w for w in wrapped if k.startswith(w)), None)
        sd[k if pre is None else pre[:-len("base.")] + k[len(pre):]] = v.contiguous()
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)               # a quantized head (lm_head.qweight ...) is kept
    perm_modules = [f"layers.{i}.{nm}" for i, l in enumerate(model.layers) for nm in LINEARS
                    if getattr(getattr(get(l, nm), "base", get(l, nm)), "perm", None) is not None]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "specq"})
    if residuals is not None:
        save_file(residuals, str(out / store.FILE), metadata={"format": "specq-residual"})
    elif (out / store.FILE).exists():
        (out / store.FILE).unlink()                  # a stale file from an earlier run into the same directory
    conf = model.cfg.to_dict()
    conf["quantization"] = dict(q, dtype=_dtype_name(model.dtype), perm_modules=perm_modules, **(extra or {}))
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    if tokenizer is not None:
        tokenizer.tok.save(str(out / "tokenizer.json"))
        tc = {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return out


def load_quantized(path, dtype=None, device="cpu"):
    """Load a specq quantized directory -> (Transformer with quantized modules, Tokenizer or None).

    dtype: compute dtype (None = the one saved)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from .quantize import check_args
    p = Path(path)
    try:
        conf = json.loads((p / "config.json").read_text())
        q = conf.pop("quantization")
        saved = DTYPES[q["dtype"]]
        check_args(q["format"], "rtn" if str(q["method"]).startswith("hf-") else q["method"], q["bits"], q["group_size"])
        cfg = ModelConfig(**conf)
    except FileNotFoundError as e:
        raise SpecqError(f"not a specq quantized checkpoint: {e.filename} missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SpecqError(f"corrupt quantized checkpoint config {p / 'config.json'}: {type(e).__name__}: {e}") from None
    try:
        sd = load_file(str(p / "model.safetensors"))
    except (FileNotFoundError, SafetensorError, OSError, RuntimeError) as e:
        raise SpecqError(f"corrupt or missing weights {p / 'model.safetensors'}: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    perm = set(q.get("perm_modules", []))
    for i, layer in enumerate(model.layers):
        for nm in LINEARS:
            lin = get(layer, nm)
            set_(layer, nm, empty_module(q, nm, lin.in_features, lin.out_features, lin.bias is not None, saved,
                                         f"layers.{i}.{nm}" in perm))
    qhead = bool(q.get("lm_head", False))
    if qhead and not q["format"].endswith("a16"):
        raise SpecqError(f"corrupt quantized checkpoint config {p / 'config.json'}: lm_head quantized in {q['format']}")
    if qhead:                                        # untied even when tie_word_embeddings
        model.lm_head = empty_module(q, "lm_head", cfg.hidden_size, cfg.vocab_size, False, saved)
    model = _materialize(model, saved, device)
    if cfg.tie_word_embeddings and not qhead and "lm_head.weight" not in sd and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise SpecqError(f"corrupt quantized checkpoint {p}: missing {missing[:3]} unexpected {extra[:3]}")
    for k, t in want.items():
        if sd[k].shape != t.shape or sd[k].dtype != t.dtype:
            raise SpecqError(f"corrupt quantized checkpoint {p}: {k} is {sd[k].dtype}{list(sd[k].shape)}, "
                             f"expected {t.dtype}{list(t.shape)}")
        if t.is_floating_point() and not torch.isfinite(sd[k]).all():
            raise SpecqError(f"corrupt quantized checkpoint {p}: {k} has non-finite values")
    model.load_state_dict(sd, strict=True)
    if dtype is not None and dtype != saved:
        _cast(model, dtype)
    if cfg.tie_word_embeddings and not qhead:
        model.lm_head.weight = model.embed_tokens.weight
    for m in [get(layer, nm) for layer in model.layers for nm in LINEARS] + [model.lm_head]:
        if isinstance(m, WQLinear) and not m.sym and (m.zeros.float() > (1 << m.bits) - 1).any():
            raise SpecqError(f"corrupt quantized checkpoint {p}: zero point out of range")
    from ..models.config import rope_inv_freq
    model.inv_freq = rope_inv_freq(cfg).to(device)
    if q.get("compensate") is not None:             # saved by `specq quantize --compensate`: residuals beside
        from ..compensate import store               # the weights, k set later (tune.apply_compensation)
        store.load(model, p, q["compensate"])
    model.quant_info = {k: v for k, v in q.items() if k not in ("dtype", "perm_modules")}
    from ..models.hf import load_hf_tokenizer
    return model.eval(), load_hf_tokenizer(p, cfg)


def _materialize(model, dtype, device):
    return _cast(model.to_empty(device=device), dtype)


def _cast(model, dtype):
    for mod in model.modules():           # float params / buffers to the compute dtype (ints untouched)
        for name, t in list(mod._parameters.items()):
            if t is not None and t.is_floating_point():
                mod._parameters[name] = torch.nn.Parameter(t.to(dtype), requires_grad=False)
        for name, t in list(mod._buffers.items()):
            if t is not None and t.is_floating_point() and name != "inv_freq":
                mod._buffers[name] = t.to(dtype)
    return model


# ---------------------------------------------------------------- Hugging Face GPTQ / AWQ import

def _nibbles(w):  # int32 [..., C] -> uint8 [..., C, 8], nibble j in position j
    w = w.to(torch.int64) & 0xFFFFFFFF
    return ((w[..., None] >> (4 * torch.arange(8))) & 0xF).to(torch.uint8)


def gptq_unpack(qweight, qzeros, scales, g_idx=None, v1=True):
    """One GPTQ 4-bit Linear -> codes [N, K], zeros [K//G, N], scales [K//G, N] float, g_idx [K]."""
    Kw, N = qweight.shape
    K = Kw * 8
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(K, N).t()         # [N, K]
    ng = scales.shape[0]
    if qzeros.shape != (ng, N // 8) or scales.shape[1] != N:
        raise SpecqError(f"GPTQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)}")
    zeros = _nibbles(qzeros).reshape(ng, N).float() + (1 if v1 else 0)
    if g_idx is None:
        g_idx = torch.arange(K) // (K // ng)
    return codes, zeros, scales.float(), g_idx.long()


def awq_unpack(qweight, qzeros, scales):
    """One AWQ GEMM 4-bit Linear -> codes [N, K], zeros [K//G, N], scales [K//G, N], g_idx [K]."""
    K, Nw = qweight.shape
    N = Nw * 8
    inv = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])      # column c sits in nibble inv[c]
    codes = _nibbles(qweight)[..., inv].reshape(K, N).t()
    ng = scales.shape[0]
    if qzeros.shape != (ng, Nw) or scales.shape[1] != N:
        raise SpecqError(f"AWQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)}")
    zeros = _nibbles(qzeros)[..., inv].reshape(ng, N).float()
    return codes, zeros, scales.float(), torch.arange(K) // (K // ng)


def fuse_wq(parts, group_size, sym, bias=None, dtype=torch.float32):
    """parts: list of (codes [N_i, K], zeros [ng, N_i], scales [ng, N_i], g_idx [K]) -> one WQLinear."""
    g_idx = parts[0][3]
    for p in parts[1:]:
        if not torch.equal(p[3], g_idx):
            raise SpecqError("cannot fuse act-order projections whose g_idx differ")
    codes = torch.cat([p[0] for p in parts])
    zeros = torch.cat([p[1] for p in parts], 1).t()
    scales = torch.cat([p[2] for p in parts], 1).t()
    K = codes.shape[1]
    ng = scales.shape[1]
    G = K // ng
    perm = None
    if not torch.equal(g_idx, torch.arange(K) // G):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(K) // G):
            raise SpecqError("g_idx does not assign exactly group_size channels to each group")
        codes = codes[:, perm]
    return WQLinear.from_codes(codes, scales, zeros, 4, group_size, sym, bias, dtype, perm)


def load_hf_quantized(path, dtype=torch.float32, device="cpu"):
    """Import a Hugging Face GPTQ or AWQ (GEMM) 4-bit checkpoint directory into a specq Transformer."""
    from safetensors.torch import load_file
    p = Path(path)
    try:
        conf = json.loads((p / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise SpecqError(f"cannot read {p / 'config.json'}: {e}") from None
    qc = conf.get("quantization_config") or {}
    if not qc and (p / "quantize_config.json").is_file():
        qc = json.loads((p / "quantize_config.json").read_text())
    method = (qc.get("quant_method") or "gptq").lower()
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    G = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method not in ("gptq", "awq") or bits != 4:
        raise SpecqError(f"unsupported HF quantization: method={method} bits={bits} (supported: 4-bit gptq, awq)")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise SpecqError(f"unsupported AWQ version {qc.get('version')!r} (supported: gemm)")
    v1 = str(qc.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    sym = bool(qc.get("sym", False)) if method == "gptq" else not qc.get("zero_point", True)
    cfg = ModelConfig.from_hf(conf)
    sd = {}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise SpecqError(f"no .safetensors files in {p}")
    for f in files:
        sd.update(load_file(str(f)))
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    model = Transformer(cfg).to(dtype)
    group = -1 if G == -1 else G

    def take(k):
        if k not in sd:
            raise SpecqError(f"checkpoint {p} lacks tensor {k}")
        return sd[k]

    def unpack(prefix):
        if method == "gptq":
            return gptq_unpack(take(prefix + ".qweight"), take(prefix + ".qzeros"), take(prefix + ".scales"),
                               sd.get(prefix + ".g_idx"), v1)
        return awq_unpack(take(prefix + ".qweight"), take(prefix + ".qzeros"), take(prefix + ".scales"))

    with torch.no_grad():
        model.embed_tokens.weight.copy_(take("embed_tokens.weight"))
        model.norm.weight.copy_(take("norm.weight"))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(take("lm_head.weight"))
        for i, layer in enumerate(model.layers):
            pre = f"layers.{i}."
            layer.input_layernorm.weight.copy_(take(pre + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(pre + "post_attention_layernorm.weight"))
            a = pre + "self_attn."
            qkv = [unpack(a + x) for x in ("q_proj", "k_proj", "v_proj")]
            bias = torch.cat([take(a + x + ".bias") for x in ("q_proj", "k_proj", "v_proj")]) if cfg.attention_bias else None
            layer.self_attn.qkv_proj = fuse_wq(qkv, group, sym, bias, dtype)
            layer.self_attn.o_proj = fuse_wq([unpack(a + "o_proj")], group, sym, None, dtype)
            m = pre + "mlp."
            layer.mlp.gate_up_proj = fuse_wq([unpack(m + "gate_proj"), unpack(m + "up_proj")], group, sym, None, dtype)
            layer.mlp.down_proj = fuse_wq([unpack(m + "down_proj")], group, sym, None, dtype)
    model.quant_info = dict(format="w4a16", method=f"hf-{method}", bits=4, group_size=group, sym=sym,
                            act_order=bool(qc.get("desc_act", False)), alpha=None)
    return model.to(device)
