"""One Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) with a static KV cache.

The forward is graph-friendly and general: it takes M new tokens with explicit rope positions,
the cache slots to write their K/V into, and a boolean attention mask over every cache slot.
One call therefore does prefill, 1-token decode, chain verification and tree verification.

    logits, hidden = model(ids[M], pos[M], slots[M], mask[M, S])     S = cache capacity

Slots before the new block hold the accepted context; `keep(src, dst)` moves an accepted tree
path's K/V into place (rollback is simply not attending to slots past the accepted length).
Contract: a token attends to no slot beyond its own (its context and ancestors sit at lower slots); the one-token
CUDA decode kernel (specq.kernels.decode_attn) reads only slots 0..slot.
Module names follow Hugging Face's, except fused qkv_proj and gate_up_proj (faster decode).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused
from .config import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # [M, D]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache: k, v [n_kv, S, hd]. Subclasses may store other dtypes (int8)."""

    def __init__(self, n_kv: int, size: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(n_kv, size, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(n_kv, size, head_dim, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        """slots [M]; k, v [n_kv, M, hd] -> full k, v [n_kv, S, hd] for attention."""
        self.k.index_copy_(1, slots, k.to(self.k.dtype))
        self.v.index_copy_(1, slots, v.to(self.v.dtype))
        return self.k, self.v

    def move(self, src, dst):
        """Copy slots src [P] onto dst [P] (accepted tree path into place)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


# Regional compilation wherever a whole forward would be torch.compile'd (Decoder, TreeRunner, the e2e units):
# Transformer.compile_blocks instead, the code around the layers eager. Set by `--compile-blocks` (CLI) and
# `bench/e2e.py --compile-mode blocks`; far shorter compiles at 32-80 layers, a step ~2% slower (docs/results.md).
COMPILE_BLOCKS = False

KERNEL_MAX_M = 64      # CUDA, up to this many tokens: specq.kernels.attention (flash-decoding) instead of SDPA


def rotate(x, cos, sin):  # x [H, M, hd]; cos, sin [M, hd]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, slots, mask, norm=None, residual=None):  # x [M, D]; mask [M, S] bool
        """attention(norm(x)) (+ residual): the norm and the residual add go to fused.linear with qkv / o_proj."""
        M = x.shape[0]
        qkv = fused.linear(self.qkv_proj, x, norm=norm)     # [M, (H + 2 Hkv) hd]
        c = self.cache
        if M == 1 and qkv.is_cuda and type(c) is KVCache:    # decoding: rope, cache write, attention: 2 launches
            from ..kernels import decode_attn as DE
            if DE.usable(qkv, c.k, c.v, mask):
                y = DE.decode_attention(qkv, cos, sin, slots, c.k, c.v, mask, self.nh, self.nkv)
                return fused.linear(self.o_proj, y, residual=residual)
        if M <= KERNEL_MAX_M and qkv.is_cuda and type(c) is KVCache:   # rope + cache write in one kernel
            from ..kernels import rope as RC
            if RC.usable(qkv, c.k, c.v):
                return self._attend(RC.rope_cache(qkv, cos, sin, slots, c.k, c.v, self.nh, self.nkv), c.k, c.v,
                                    mask, residual)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(M, self.nh, self.hd).transpose(0, 1)     # [H, M, hd]
        k = k.view(M, self.nkv, self.hd).transpose(0, 1)    # [Hkv, M, hd]
        v = v.view(M, self.nkv, self.hd).transpose(0, 1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        K, V = c.update(slots, k, v)                        # [Hkv, S, hd]
        return self._attend(q, K, V, mask, residual)

    def _attend(self, q, K, V, mask, residual):  # q [H, M, hd]; K, V [Hkv, S, hd] -> o_proj(attention) (+ residual)
        M = q.shape[1]
        K, V = K.to(q.dtype), V.to(q.dtype)
        if M <= KERNEL_MAX_M and q.is_cuda:                 # few tokens: specq's split-cache attention kernel
            from ..kernels import attention as DA
            if DA.usable(q, K, mask):
                y = DA.attention(q, K, V, mask)                                  # [H, M, hd]
                return fused.linear(self.o_proj, y.transpose(0, 1).reshape(M, self.nh * self.hd), residual=residual)
        # grouped-query attention without copying K/V per query head: the rep query heads that share a KV head
        # become rep * M query rows of that head (head h uses KV head h // rep, as repeat_interleave would)
        rep = self.nh // self.nkv
        qg = q.reshape(self.nkv, rep * M, self.hd)           # [Hkv, rep*M, hd], row r*M + m = head r, token m
        mg = mask.repeat(rep, 1) if rep > 1 else mask        # [rep*M, S]
        y = F.scaled_dot_product_attention(qg.unsqueeze(0), K.unsqueeze(0), V.unsqueeze(0), attn_mask=mg)
        y = y[0].reshape(self.nh, M, self.hd)                # [H, M, hd]
        return fused.linear(self.o_proj, y.transpose(0, 1).reshape(M, self.nh * self.hd), residual=residual)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, norm=None, residual=None):  # x [M, D] -> down(silu(g) * u) (+ residual), g | u = gate_up(norm(x))
        g, u = fused.linear(self.gate_up_proj, x, norm=norm).split(self.inter, dim=-1)     # [M, I] each
        return fused.linear(self.down_proj, F.silu(g) * u, residual=residual)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, slots, mask):
        # x + attn(norm1(x)), then x + mlp(norm2(x)): norms and residual adds fused into the matmuls where they can
        x = self.self_attn(x, cos, sin, slots, mask, norm=self.input_layernorm, residual=x)
        return self.mlp(x, norm=self.post_attention_layernorm, residual=x)


def compile_layers(layers, dynamic=None, mode=None) -> None:
    """torch.compile each decoder layer in place (regional compilation; Transformer.compile_blocks, EAGLE heads).
    Block.forward is one code object for every model in the process (target, draft, intermediate, EAGLE head),
    token count and cache size: more cache entries than dynamo's default 8, so the limits are raised; and
    fullgraph=False: a variant past the limit runs eager (with dynamo's warning) instead of failing a request."""
    import torch._dynamo.config as dcfg
    for k, v in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512),
                 ("accumulated_recompile_limit", 512)):
        if hasattr(dcfg, k):
            setattr(dcfg, k, max(getattr(dcfg, k), v))
    for blk in layers:
        blk.compile(fullgraph=False, dynamic=dynamic, mode=mode)


def compile_step(model, fn, **kw):
    """A step function of `model` made ready for torch.compile: its quantized Linears registered as opaque ops,
    then either fn itself over regionally compiled layers (COMPILE_BLOCKS) or torch.compile(fn, **kw)."""
    from ..quant.opaque import register_all
    from ..kernels import pdl
    register_all(model)
    pdl.configure_inductor(model.device)   # sm_90+: inductor's kernels use programmatic dependent launch too
    if COMPILE_BLOCKS:
        model.compile_blocks()
        return fn
    return torch.compile(fn, **kw)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.cache_size = 0

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def setup_cache(self, size: int, dtype=None, device=None, cache_cls=KVCache, **kw):
        """Preallocate a static cache of `size` slots (context + the largest draft)."""
        dtype = dtype or self.dtype
        device = device or self.device
        for layer in self.layers:
            a = layer.self_attn
            a.cache = cache_cls(a.nkv, size, a.hd, dtype, device, **kw)
        self.cache_size = size

    def compile_blocks(self, dynamic=None, mode=None):
        """Regional compilation: every decoder layer torch.compile'd in place. The layers share one compiled graph
        (their weights, caches and quantized-Linear handles are graph inputs, not constants), so compiling costs one
        layer, not num_layers of them. The head (final norm + lm_head) is a second graph; the loop over layers and
        the embedding stay eager (CUDA graphs capture them all the same). dynamic=None: dynamo's automatic dynamic shapes."""
        from ..quant.opaque import register_all
        register_all(self)
        key = (dynamic, mode)
        if getattr(self, "_compiled_blocks", None) != key:
            compile_layers(self.layers, dynamic, mode)
            # final norm + lm_head in one graph (inductor fuses the norm into the M=1 lm_head reduction)
            self.__dict__["_head_compiled"] = torch.compile(self.head, dynamic=dynamic, mode=mode)
            self._compiled_blocks = key
        return self

    def keep(self, src, dst):
        """Move K/V of slots src [P] to slots dst [P] in every layer (accept a tree path)."""
        if torch.equal(src, dst):
            return
        for layer in self.layers:
            layer.self_attn.cache.move(src, dst)

    def rope(self, pos):  # pos [M] -> cos, sin [M, hd]
        f = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((f, f), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, ids, pos, slots, mask, return_hidden: bool = True, logits_rows=None):
        """ids, pos, slots [M] long; mask [M, S] bool -> logits [M', V] (float32), hidden [M, D].

        hidden is the final-norm output (the feature EAGLE heads read). logits_rows, if given,
        selects which rows to project through lm_head (e.g. only the last row in a prefill).
        """
        assert self.cache_size, "call setup_cache() first"
        x = self.embed_tokens(ids)
        cos, sin = self.rope(pos)
        for layer in self.layers:
            x = layer(x, cos, sin, slots, mask)
        head = self.__dict__.get("_head_compiled")
        if head is None:
            head = self.head
        elif isinstance(logits_rows, slice):   # a tensor, not slice constants: one compiled head for every length
            logits_rows = torch.arange(*logits_rows.indices(x.shape[0]), device=x.device)
        logits, h = head(x, logits_rows)
        return (logits, h) if return_hidden else logits

    def head(self, x, logits_rows=None):  # x [M, D] -> logits [M', V] float32, final-norm output h [M, D]
        h = self.norm(x)
        hl = h if logits_rows is None else h[logits_rows]
        return self.lm_head(hl).float(), h


def causal_mask(start: int, m: int, size: int, device=None):
    """Mask [m, size]: row i sees slots 0..start+i (new tokens written at start..start+m-1)."""
    j = torch.arange(size, device=device)
    i = torch.arange(m, device=device)
    return j[None, :] <= (start + i)[:, None]


def block_mask(start: int, tree_mask, size: int):
    """Mask [M, size] for M new tokens at slots start.. with tree_mask [M, M] among themselves."""
    M = tree_mask.shape[0]
    mask = torch.zeros(M, size, dtype=torch.bool, device=tree_mask.device)
    mask[:, :start] = True
    mask[:, start:start + M] = tree_mask
    return mask
