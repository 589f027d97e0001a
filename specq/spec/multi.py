"""Multi-draft tree shape and sibling sampling (RRS i.i.d., RRS without replacement, SpecHub).

Shape: every node of the first `branch` levels gets n_drafts children drawn from the draft's q at
that node, deeper levels grow one child per node (chains), up to depth k. n_drafts=2, branch=k=4
is the 31-node binary tree of the SpecHub paper; n_drafts=1 is a plain chain.
Nodes are numbered level by level, so each level is a contiguous index range.
"""
from __future__ import annotations

import torch

from ..errors import SpecqError
from ..sampling import sample

SCHEMES = ("iid", "wo", "spechub")


def level_widths(k: int, n: int, branch: int) -> list[int]:
    """Number of nodes at depths 0..k."""
    w = [1]
    for d in range(k):
        w.append(w[-1] * (n if d < branch else 1))
    return w


def default_branch(k: int, n: int, limit: int = 64) -> int:
    """Deepest branching (<= k) whose tree stays within `limit` nodes (at least 1 level)."""
    if n == 1:
        return k
    b = 1
    while b < k and sum(level_widths(k, n, b + 1)) <= limit:
        b += 1
    return b


def check(k, n_drafts, scheme, branch):
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise SpecqError(f"invalid draft length k={k!r}: must be an integer >= 1")
    if not isinstance(n_drafts, int) or isinstance(n_drafts, bool) or n_drafts < 1:
        raise SpecqError(f"invalid n_drafts={n_drafts!r}: must be an integer >= 1")
    if scheme not in SCHEMES:
        raise SpecqError(f"unknown multi-draft scheme {scheme!r} (choose from: {', '.join(SCHEMES)})")
    if scheme == "spechub" and n_drafts != 2:
        raise SpecqError(f"scheme 'spechub' needs n_drafts=2 (got {n_drafts})")
    if branch is not None and (not isinstance(branch, int) or not 0 <= branch <= k):
        raise SpecqError(f"invalid branch_depth={branch!r}: must be an integer in 0..k")


def draw_children(logits, q, width: int, scheme: str, greedy: bool, gen) -> torch.Tensor:
    """logits, q [W, V] of W parent nodes -> children tokens [W, width], -1 where q's support is too
    small for distinct drafts ("wo", "spechub"); such children are dropped from the tree.

    Greedy: the top-`width` tokens (distinct; greedy verification needs no q). Otherwise drawn from q
    per scheme, which must match the verifier (iid -> rrs/sampling, wo -> rrs-wo, spechub)."""
    if greedy:
        return logits.topk(width, dim=-1).indices if width > 1 else logits.argmax(-1, keepdim=True)
    if width == 1:
        return sample(q, gen)[:, None]
    from .verify import sample_children
    return sample_children(q, width, scheme, gen)
