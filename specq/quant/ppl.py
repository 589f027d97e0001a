"""Perplexity over non-overlapping windows of `ctx` tokens (each window starts with an empty cache;
its first token is context only, every later token is scored). Returns (ppl, tokens scored)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import SpecqError
from ..models.llama import causal_mask
from .. import paths

DATASETS = {"wikitext2": "wikitext2_test.txt", "wikitext2_valid": "wikitext2_valid.txt"}


def eval_text(name: str) -> str:
    if name in DATASETS:
        return paths.data_file(DATASETS[name]).read_text(encoding="utf-8")
    from pathlib import Path
    p = Path(name)
    if not p.is_file():
        raise SpecqError(f"--data {name!r} is neither {' / '.join(DATASETS)} nor an existing text file")
    return p.read_text(encoding="utf-8", errors="replace")


@torch.inference_mode()
def perplexity(model, ids, ctx: int = 2048, max_tokens: int | None = None, progress: bool = True):
    """ids: 1-D LongTensor of the tokenised text; max_tokens caps the tokens read (None = all)."""
    if ctx < 2:
        raise SpecqError(f"context length must be at least 2, got {ctx}")
    ids = ids[:max_tokens] if max_tokens else ids
    if ids.numel() < 2:
        raise SpecqError("need at least 2 tokens to compute perplexity")
    dev = model.device
    model.setup_cache(ctx)
    nll, count = 0.0, 0
    starts = list(range(0, ids.numel() - 1, ctx))
    for s in tqdm(starts, desc="ppl", disable=not progress, unit="win"):
        x = ids[s:s + ctx].to(dev)
        L = x.numel()
        if L < 2:
            break
        pos = torch.arange(L, device=dev)
        logits = model(x, pos, pos, causal_mask(0, L, ctx, device=dev), return_hidden=False)
        nll += F.cross_entropy(logits[:-1].float(), x[1:], reduction="sum").item()
        count += L - 1
    return math.exp(nll / count), count
