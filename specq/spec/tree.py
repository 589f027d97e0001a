"""Draft trees as data: the EAGLE-2 dynamic tree builder and small tree helpers.

EAGLE-2 expansion (`grow`), every score a cumulative log-probability along the path from the root:
  1. the root's top_k children are the first beams;
  2. `depth` times: every beam is expanded by its top_k children (a draft forward over the k beams);
     all k*k children become candidates, the global top_k of them the next beams;
  3. the `total_tokens - 1` best candidates (plus the root) are kept.
Scores only fall along a path (log-probabilities are <= 0) and ties are broken by candidate order,
in which a parent always precedes its children, so a kept node's ancestors are always kept.

A tree is (tokens [N], parents [N]) with node 0 the root, parents[0] = -1, parents[i] < i.
"""
from __future__ import annotations

import torch

from ..errors import SpecqError


def grow(root, logp_root, step, top_k: int, depth: int, total_tokens: int, levels: bool = False):
    """Build an EAGLE-2 tree. Static shapes and no host syncs (CUDA-graph safe when root is a tensor).

    root: token id (int, or a long tensor of one element); logp_root [V]: log-probabilities of the root's children.
    step(tokens [k], parent_pos [k] | None) -> logp [k, V]: the draft forward over the current beams
        (tokens of the beams; parent_pos[i] = index, in the previous call's beams, of beam i's parent;
        None on the first call, whose beams are the root's children).
    Returns tokens [N], parents [N], scores [N] (root score 0), N = min(total_tokens, candidates + 1);
    with levels=True also the depth of each node [N] (root 0).
    """
    dev = logp_root.device
    k = min(top_k, logp_root.shape[-1])
    s, t = logp_root.float().topk(k)                     # [k]
    toks, pars, scores = [t], [torch.zeros(k, dtype=torch.long, device=dev)], [s]
    lev = [torch.ones(k, dtype=torch.long, device=dev)]
    beam_ids = torch.arange(1, k + 1, device=dev)        # candidate ids of the beams (root = 0)
    beam_scores, beam_toks, parent_pos, n = s, t, None, k + 1
    for _ in range(depth):
        logp = step(beam_toks, parent_pos).float()       # [k, V]
        cs, ct = logp.topk(k, dim=-1)                    # [k, k]
        cum = (beam_scores[:, None] + cs).reshape(-1)    # [k*k]
        toks.append(ct.reshape(-1))
        pars.append(beam_ids[:, None].expand(k, k).reshape(-1))   # (no repeat_interleave: it syncs)
        scores.append(cum)
        lev.append(torch.full((k * k,), len(lev) + 1, dtype=torch.long, device=dev))
        best = cum.topk(k).indices                       # next beams, positions in this level [k]
        beam_ids = n + best
        beam_scores, beam_toks, parent_pos = cum[best], ct.reshape(-1)[best], best // k
        n += k * k
    tok = torch.cat(toks)
    par = torch.cat(pars)
    sc = torch.cat(scores)
    keep = select(sc, total_tokens - 1)                  # candidate rows (0-based, root excluded)
    new = torch.full((n,), -1, dtype=torch.long, device=dev)
    new[:1].fill_(0)              # (no `t[i] = number` in graph code: on CUDA it copies from host)
    new[keep + 1] = torch.arange(1, keep.numel() + 1, device=dev)
    root_t = root.reshape(1).to(dev) if torch.is_tensor(root) else torch.tensor([root], device=dev)
    tokens = torch.cat([root_t, tok[keep]])
    parents = torch.cat([torch.full((1,), -1, dtype=torch.long, device=dev), new[par[keep]]])
    scores = torch.cat([torch.zeros(1, device=dev), sc[keep]])
    if levels:
        return tokens, parents, scores, torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cat(lev)[keep]])
    return tokens, parents, scores


def select(scores, n: int):
    """Indices (ascending) of the n best scores; ties go to the earlier index."""
    n = max(0, min(n, scores.numel()))
    order = torch.sort(-scores, stable=True).indices[:n]
    return order.sort().values


def ancestor_mask(parents) -> torch.Tensor:
    """parents [N] -> [N, N] bool: row i is True at i and at every ancestor of i."""
    n = parents.numel()
    dev = parents.device
    m = torch.eye(n, dtype=torch.bool, device=dev)
    rows = torch.arange(n, device=dev)
    cur = parents.clone()
    while bool((cur >= 0).any()):
        ok = cur >= 0
        m[rows[ok], cur[ok]] = True
        cur = torch.where(ok, parents[cur.clamp(min=0)], cur)
    return m


def ancestors_static(parents, max_depth: int) -> torch.Tensor:
    """As ancestor_mask, without host syncs: max_depth parent hops (>= the tree's depth)."""
    n, dev = parents.numel(), parents.device
    m = torch.eye(n, dtype=torch.bool, device=dev)
    rows = torch.arange(n, device=dev)
    cur = parents
    for _ in range(max_depth):
        ok = cur >= 0
        c = cur.clamp_min(0)
        m[rows, c] = m[rows, c] | ok
        cur = torch.where(ok, parents[c], cur)
    return m


def positions(parents) -> torch.Tensor:
    """parents [N] -> depth of each node [N] (root 0): add the root's position to get rope positions."""
    return ancestor_mask(parents).sum(-1) - 1


def leaf_paths(parents) -> torch.Tensor:
    """parents [N] -> [L, max_depth + 1] node indices of every root-to-leaf path, padded with -1."""
    par = parents.tolist()
    n = len(par)
    has_child = [False] * n
    for p in par[1:]:
        has_child[p] = True
    paths = []
    for i in range(n):
        if not has_child[i]:
            path = [i]
            while par[path[-1]] >= 0:
                path.append(par[path[-1]])
            paths.append(path[::-1])
    w = max(len(p) for p in paths)
    return torch.tensor([p + [-1] * (w - len(p)) for p in paths], dtype=torch.long)


def static_tree(paths: list[list[int]]):
    """A fixed tree shape from EAGLE-1/Medusa style choices, e.g. [[0], [1], [0, 0], [0, 1]]:
    each path lists child ranks (0 = the draft's best token) from the root.
    Returns parents [N] and rank [N] (rank of each node among its parent's draft top-k; root -1),
    nodes ordered by depth then path, so parents come first."""
    uniq = sorted({tuple(p) for p in paths if len(p)}, key=lambda p: (len(p), p))
    index = {(): 0}
    parents, rank = [-1], [-1]
    for p in uniq:
        if p[:-1] not in index:
            raise SpecqError(f"static tree path {list(p)} has no parent path {list(p[:-1])}")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
        rank.append(p[-1])
    return torch.tensor(parents, dtype=torch.long), torch.tensor(rank, dtype=torch.long)
