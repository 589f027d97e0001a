"""Random-weight models of real shapes, built directly in their quantized (packed) form on the device,
layer by layer: no full-precision copy of a large model is ever made. Kernel speed does not depend on
weight values; values are random, never zero.

Formats: bf16 (nn.Linear), w4a16 (WQLinear g128: whatever its CUDA path does), w8a8 and w4a8 g128
(specq's Triton int8 kernels through small modules below: W8A8Linear / W4A8Linear run reference
integer math and have no CUDA kernel path). lm_head: in dtype (tied when the config ties it), or with
quant_head a W4A16 WQLinear of its own (w4a16 models only).
share_codes: random 4-bit codes drawn once per matrix shape and handed to every layer's module; each
module still makes its own kernel-layout copy, so every layer reads its own weights from memory
(a layer's weights are far larger than the L2 cache). Saves a second copy of a 70B model's codes.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn

from ..errors import SpecqError
from ..models.config import ModelConfig, rope_inv_freq
from ..models.llama import Transformer
from ..quant import opaque
from ..quant.calib import LINEARS, set_
from ..quant.wq import WQLinear

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                       num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=8192,
                        tie_word_embeddings=True),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, tie_word_embeddings=True),
    # CPU test sizes (the CPU runs the same code with toy shapes)
    "tiny": dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2),
    "tiny-1b": dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2, num_kv_heads=1,
                    tie_word_embeddings=True),
}
FORMATS = ("bf16", "w4a16", "w8a8", "w4a8")
GROUP = 128


def config(name: str, **over) -> ModelConfig:
    if name not in SHAPES:
        raise SpecqError(f"unknown model shape {name!r} (known: {', '.join(SHAPES)})")
    return ModelConfig(**{**SHAPES[name], **over})


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Linear name -> (K, N) of one decoder layer."""
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return {"self_attn.qkv_proj": (D, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd),
            "self_attn.o_proj": (cfg.num_heads * hd, D), "mlp.gate_up_proj": (D, 2 * I), "mlp.down_proj": (I, D)}


def linear_bytes(fmt: str, K: int, N: int) -> int:
    """Bytes a kernel reads for one (N, K) weight: codes + scales as specq's kernels store them."""
    if fmt == "bf16":
        return 2 * N * K
    if fmt == "w4a16":
        return N * K // 2 + 2 * 2 * N * K // GROUP            # int4 codes + bf16 scales and zero terms
    if fmt == "w8a8":
        return N * K + 4 * N                                  # int8 + fp32 channel scales
    if fmt == "w4a8":
        return N * K // 2 + 4 * N * K // GROUP + 4 * N        # int4 + int32 group scales + fp32 channel scales
    raise SpecqError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def weight_bytes_per_token(cfg: ModelConfig, fmt: str, quant_head: bool = False) -> int:
    """Weight bytes read per decoded token: every decoder Linear + the lm_head (bf16, or in `fmt` with
    quant_head, as build_random makes it) (embedding: one row)."""
    per_layer = sum(linear_bytes(fmt, K, N) for K, N in linear_shapes(cfg).values())
    V, D = cfg.vocab_size, cfg.hidden_size
    return cfg.num_layers * per_layer + (linear_bytes(fmt, D, V) if quant_head else 2 * V * D)


class KernelW8A8(nn.Module):
    """W8A8 Linear on specq's Triton int8 kernel (per-token int8 activations)."""

    def __init__(self, w8, sw):  # w8 int8 [N, K], sw float32 [N]
        super().__init__()
        from ..kernels import prepare_w8a8
        self.in_features, self.out_features = w8.shape[1], w8.shape[0]
        self.w = prepare_w8a8(w8, sw)

    def matmul2d(self, x2):  # x2 [M, K] -> [M, N]
        from ..kernels import w8a8_linear
        return w8a8_linear(x2, self.w)

    def forward(self, x):    # one opaque op under torch.compile (specq.quant.opaque)
        return opaque.matmul(self, x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)


class KernelW4A8(nn.Module):
    """W4A8 g128 Linear on specq's Triton int8 kernel (canonical codes repacked once by prepare_w4a8)."""

    def __init__(self, codes, sw, gs):  # codes int32 [N, K//8]; sw float32 [N]; gs [N, K//128] in 1..16
        super().__init__()
        from ..kernels import prepare_w4a8
        self.in_features, self.out_features = codes.shape[1] * 8, codes.shape[0]
        self.w = prepare_w4a8(codes, sw, gs)

    def matmul2d(self, x2):  # x2 [M, K] -> [M, N]
        from ..kernels import w4a8_linear
        return w4a8_linear(x2, self.w)

    def forward(self, x):    # one opaque op under torch.compile (specq.quant.opaque)
        return opaque.matmul(self, x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _codes(K, N, device, shared):
    key = (K, N)
    if shared is not None and key in shared:
        return shared[key]
    c = torch.randint(-2**31, 2**31, (N, K // 8), dtype=torch.int32, device=device)
    if shared is not None:
        shared[key] = c
    return c


def make_linear(fmt: str, K: int, N: int, device, dtype, shared: dict | None = None) -> nn.Module:
    """A random (N, K) Linear in `fmt`, built in place on `device`. Weight std about 1/sqrt(K)."""
    std = K ** -0.5
    if fmt == "bf16":
        m = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            m.weight.normal_(0.0, std)
        return m.requires_grad_(False)
    if fmt == "w4a16":
        m = WQLinear(K, N, 4, GROUP, True, False, dtype, device)
        c = _codes(K, N, device, shared)
        if shared is not None:
            m.qweight = c                                  # shared codes: no second copy
        else:
            m.qweight.copy_(c)
        m.scales.copy_((0.75 + 0.5 * torch.rand(N, K // GROUP, device=device)) * std / 4.6)
        return m
    if fmt == "w8a8":
        w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
        return KernelW8A8(w8, torch.full((N,), std / 73.0, device=device))
    if fmt == "w4a8":
        gs = torch.randint(1, 17, (N, K // GROUP), dtype=torch.int32, device=device)
        return KernelW4A8(_codes(K, N, device, shared), torch.full((N,), std / 40.0, device=device), gs)
    raise SpecqError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


@torch.no_grad()
def build_random(cfg: ModelConfig, fmt: str, device, dtype=torch.bfloat16, seed: int = 0,
                 share_codes: bool = False, quant_head: bool = False) -> Transformer:
    """Transformer of cfg's shape with random weights; decoder Linears in `fmt`, the rest in dtype.
    quant_head (w4a16 only): lm_head is a W4A16 WQLinear [K=D, N=V] of its own codes (never shared), untied
    from embed_tokens even when tie_word_embeddings (gpt-fast's int4 mode)."""
    if fmt not in FORMATS:
        raise SpecqError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if quant_head and fmt != "w4a16":
        raise SpecqError(f"a quantized lm_head is built for w4a16 only, not {fmt}")
    torch.manual_seed(seed)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    V, D = cfg.vocab_size, cfg.hidden_size

    def param(*shape, mean=0.0, std=0.02):
        return nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) * std + mean, requires_grad=False)

    model.embed_tokens.weight = param(V, D)
    if quant_head:
        model.lm_head = make_linear("w4a16", D, V, device, dtype)
    else:
        model.lm_head.weight = model.embed_tokens.weight if cfg.tie_word_embeddings else param(V, D)
    model.norm.weight = param(D, mean=1.0)
    shared = {} if share_codes else None
    shapes = linear_shapes(cfg)
    for layer in model.layers:                              # one layer at a time, directly in its format
        layer.input_layernorm.weight = param(D, mean=1.0)
        layer.post_attention_layernorm.weight = param(D, mean=1.0)
        for nm in LINEARS:
            K, N = shapes[nm]
            set_(layer, nm, make_linear(fmt, K, N, device, dtype, shared))
    model.inv_freq = rope_inv_freq(cfg).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SpecqError(f"random model left tensors unbuilt: {left[:3]}")
    return model.eval()


@torch.no_grad()
def build_eagle_head(target: Transformer, device, dtype=torch.bfloat16, seed: int = 1):
    """EAGLE-2 head of the target's width (fc 2D -> D + one bf16 decoder layer), bound to its embed/lm_head."""
    from ..spec.eagle import EagleHead
    torch.manual_seed(seed)
    cfg = dataclasses.replace(target.cfg, num_layers=1)
    with default_dtype(dtype), torch.device(device):
        head = EagleHead(cfg, bias=True)
    for p in head.parameters():
        p.requires_grad_(False)
    head.inv_freq = rope_inv_freq(cfg).to(device)
    return head.bind(target).eval()
