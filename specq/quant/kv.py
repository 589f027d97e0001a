"""int8 KV cache: k, v int8 [n_kv, S, hd] with one fp scale per (head, token): x ~= q * scale.

Use `model.setup_cache(size, cache_cls=Int8KVCache)`; same update/move interface as KVCache.
update() returns the dequantized full cache in the compute dtype (the reference; a fused
attention kernel would read the int8 data and scales directly).
"""
from __future__ import annotations

import torch

from ..models.llama import KVCache


class Int8KVCache(KVCache):
    def __init__(self, n_kv: int, size: int, head_dim: int, dtype, device):
        super().__init__(n_kv, size, head_dim, torch.int8, device)
        self.out_dtype = dtype
        self.register_buffer("k_scale", torch.zeros(n_kv, size, 1, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("v_scale", torch.zeros(n_kv, size, 1, dtype=torch.float32, device=device), persistent=False)

    @staticmethod
    def _q(x):  # [n_kv, M, hd] -> int8 codes, scale [n_kv, M, 1]
        xf = x.float()
        s = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
        return torch.round(xf / s).clamp(-127, 127).to(torch.int8), s

    def update(self, slots, k, v):
        kq, ks = self._q(k)
        vq, vs = self._q(v)
        self.k.index_copy_(1, slots, kq)
        self.v.index_copy_(1, slots, vq)
        self.k_scale.index_copy_(1, slots, ks)
        self.v_scale.index_copy_(1, slots, vs)
        return (self.k.float() * self.k_scale).to(self.out_dtype), (self.v.float() * self.v_scale).to(self.out_dtype)

    def move(self, src, dst):
        super().move(src, dst)
        self.k_scale[:, dst] = self.k_scale[:, src]
        self.v_scale[:, dst] = self.v_scale[:, src]
