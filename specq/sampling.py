"""Sampling parameters and the one logits -> probabilities transform used by targets and drafts alike.

Temperature 0 means greedy. The same `probs()` is applied to target and draft logits, so the
speculative verifiers compare like with like.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SpecqError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise SpecqError(f"invalid temperature {t!r}: must be a finite number >= 0")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise SpecqError(f"invalid top_k {k!r}: must be an integer >= 0 (0 disables it)")
        if not isinstance(p, (int, float)) or not math.isfinite(p) or not (0 < p <= 1):
            raise SpecqError(f"invalid top_p {p!r}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> float32 probabilities [..., V]; one-hot argmax when greedy."""
    logits = logits.float()
    if sp.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = logits.topk(sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sl, si = logits.sort(dim=-1, descending=True)
        cp = sl.softmax(-1).cumsum(-1)
        drop = (cp - sl.softmax(-1)) >= sp.top_p   # keep the smallest prefix reaching top_p
        sl = sl.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, si, sl)
    return logits.softmax(-1)


def sample(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """p [..., V] probabilities -> token ids [...]."""
    flat = p.reshape(-1, p.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(p.shape[:-1])


def next_token(logits: torch.Tensor, sp: SamplingParams, generator=None) -> int:
    """logits [V] -> one token id."""
    if sp.greedy:
        return int(logits.argmax(-1))
    return int(sample(probs(logits, sp), generator))
