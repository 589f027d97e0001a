"""What proposers hand the engine, and the interface every proposer implements.

A draft is a tree, stored as data: node 0 is the root, the last emitted token (its K/V is not in
the target cache yet); every other node i is a proposed token whose parent is parents[i] < i.
A chain is a tree whose nodes each have at most one child.

    tokens  [N] long   token of each node (tokens[0] = root)
    parents [N] long   parent index, parents[0] = -1
    q       [N, V]     draft distribution (after the shared sampling transform) from which node
                       i's children were drawn; None for drafts without probabilities (n-gram)
    depth   [N] long   optional: depth of each node, precomputed by the proposer (on its device)
    anc     [N, N]     optional: ancestor mask (bool), precomputed likewise
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draft:
    tokens: torch.Tensor
    parents: torch.Tensor
    q: torch.Tensor | None = None
    scheme: str = "iid"   # how sibling drafts were drawn: "iid", "wo" (without replacement), "spechub"
    depth: torch.Tensor | None = None
    anc: torch.Tensor | None = None

    def __len__(self):
        return int(self.tokens.shape[0])

    def is_chain(self) -> bool:
        return bool(torch.equal(self.parents.cpu(), torch.arange(-1, len(self) - 1)))

    def depths(self) -> torch.Tensor:  # [N] depth of each node (root 0)
        if self.depth is not None:
            return self.depth
        d = torch.zeros(len(self), dtype=torch.long)
        par = self.parents.tolist()
        for i in range(1, len(self)):
            d[i] = d[par[i]] + 1
        return d

    def ancestor_mask(self) -> torch.Tensor:  # [N, N] bool: node i attends to j iff j is i or an ancestor
        if self.anc is not None:
            return self.anc
        n = len(self)
        m = torch.eye(n, dtype=torch.bool)
        par = self.parents.tolist()
        for i in range(1, n):
            m[i] |= m[par[i]]
        return m

    def children(self) -> list[list[int]]:
        ch: list[list[int]] = [[] for _ in range(len(self))]
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                ch[p].append(i)
        return ch


class Proposer:
    """Proposes drafts. The engine calls, in order:

    prefill(prompt [P], hidden [P, D], first)   after the target's prefill; first = first emitted token
    propose(root, sp) -> Draft                  root = last emitted token
    commit(tokens [a], hidden [a, D], nxt)      tokens whose K/V the target kept this step (root and
                                                accepted drafts, in order), the target's final-norm
                                                features at them, and the next emitted token
    """

    name = "none"

    def prefill(self, prompt: torch.Tensor, hidden: torch.Tensor, first: int) -> None:
        pass

    def propose(self, root: int, sp) -> Draft:
        raise NotImplementedError

    def commit(self, tokens: torch.Tensor, hidden: torch.Tensor, nxt: int) -> None:
        pass
