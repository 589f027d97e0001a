"""Draft-model proposer: a small Transformer drafts a chain (n_drafts=1) or a multi-draft tree.

The draft keeps its own static KV cache laid out like the target's: context token t at slot t,
tree node i of a step at slot base+i (base = position of the root). One draft forward per depth
(all nodes of a level at once, tree mask). On commit the accepted path's K/V is moved into place
with keep(); anything not fed yet (a leaf, tokens after a reset) is fed at the next propose.
"""
from __future__ import annotations

import torch

from ..models.llama import Transformer, causal_mask
from ..sampling import probs
from . import multi
from .base import Draft, Proposer


class DraftModelProposer(Proposer):
    def __init__(self, draft_model: Transformer, k: int = 4, n_drafts: int = 1, scheme: str = "iid",
                 branch_depth: int | None = None):
        multi.check(k, n_drafts, scheme, branch_depth)
        self.model, self.k, self.n, self.scheme = draft_model, k, n_drafts, scheme
        self.branch = multi.default_branch(k, n_drafts) if branch_depth is None else branch_depth
        self.widths = multi.level_widths(k, n_drafts, self.branch)   # nodes per depth 0..k
        self.max_nodes = sum(self.widths)
        self.name = "draft" if n_drafts == 1 else f"multi-{scheme}"
        self.generator = None            # set by the engine (shared with verification)
        self.ctx: list[int] = []         # committed context tokens (root excluded)
        self.n_cached = 0                # ctx[:n_cached] have valid K/V at slots 0..n_cached-1
        self.last = None                 # (tokens list, children lists, fed node count) of the last draft

    def setup(self, size: int) -> None:
        """Cache slots needed: the engine passes its target cache size (context + largest draft + padding)."""
        from ..engine import ensure_cache
        ensure_cache(self.model, size)

    def _room(self, n: int) -> None:  # grow the cache when used without setup(); K/V is recomputed
        if self.model.cache_size < n:
            self.setup(2 * n)
            self.n_cached = 0

    def prefill(self, prompt, hidden, first):
        self.ctx, self.n_cached, self.last = [int(t) for t in prompt.tolist()], 0, None
        self._room(len(self.ctx) + self.max_nodes)
        P, dev = len(self.ctx), self.model.device
        pos = torch.arange(P, device=dev)
        self.model(prompt.to(dev), pos, pos, causal_mask(0, P, self.model.cache_size, dev), return_hidden=False,
                   logits_rows=slice(P - 1, P))
        self.n_cached = P

    @torch.no_grad()
    def propose(self, root: int, sp) -> Draft:
        from .graphs import runner_for
        M, dev = self.model, self.model.device
        run = runner_for(M)
        base = len(self.ctx)
        self._room(base + self.max_nodes)
        S = M.cache_size
        # depth 0: whatever the cache lacks, then the root (slot base)
        st = self.n_cached
        n0 = base + 1 - st
        pend = torch.tensor(self.ctx[st:] + [root], device=dev)
        pos = torch.arange(st, st + n0, device=dev)
        if n0 <= 8:                                                           # usually the root and a leaf
            lg = run.forward(pend, pos, pos, causal_mask(st, n0, S, dev), base)[0][n0 - 1:]   # [1, V]
        else:
            lg = M(pend, pos, pos, causal_mask(st, n0, S, dev), return_hidden=False, logits_rows=slice(n0 - 1, n0))
        self.n_cached = base
        anc = torch.zeros(self.max_nodes, self.max_nodes, dtype=torch.bool, device=dev)
        anc[0, 0] = True
        toks, qs, parents, depth = [torch.tensor([root], device=dev)], [], [-1], [0]
        lo, hi = 0, 1                                                         # node range of the current level
        for d in range(self.k):
            q = probs(lg, sp)                                                 # [W, V]
            w = min(self.widths[d + 1] // self.widths[d], q.shape[-1])
            ch = multi.draw_children(lg, q, w, self.scheme, sp.greedy, self.generator).reshape(-1)  # [W*w]
            qs.append(q)
            par = [i for i in range(lo, hi) for _ in range(w)]                # parent of each child
            if w > 1 and not sp.greedy and self.scheme != "iid":               # drop absent drafts (-1)
                ok = (ch >= 0).tolist()
                par, ch = [i for i, o in zip(par, ok) if o], ch[torch.tensor(ok, device=dev)]
            parents += par
            depth += [d + 1] * len(par)
            toks.append(ch)
            nlo, nhi = hi, hi + len(par)
            idx = torch.arange(nlo, nhi, device=dev)
            anc[idx] = anc[torch.tensor(par, device=dev)]
            anc[idx, idx] = True
            if d == self.k - 1:
                break                                                         # leaves are not fed
            mask = torch.zeros(nhi - nlo, S, dtype=torch.bool, device=dev)
            mask[:, :base] = True
            mask[:, base:base + nhi] = anc[nlo:nhi, :nhi]
            lg = run.forward(ch, torch.full_like(idx, base + d + 1), base + idx, mask, base + nhi - 1)[0]
            lo, hi = nlo, nhi
        tokens = torch.cat(toks)
        N = tokens.shape[0]
        q = torch.cat(qs + [torch.zeros(N - hi, qs[0].shape[-1], device=dev)])  # leaves: no q (never drawn from)
        par_t = torch.tensor(parents)
        self.last = (tokens.tolist(), Draft(tokens, par_t).children(), hi)
        return Draft(tokens, par_t, q, self.scheme, depth=torch.tensor(depth), anc=anc[:N, :N])

    def _match(self, acc: list[int]) -> list[int]:
        """Node indices of the last draft spelling acc (root first); longest match if none is complete."""
        if self.last is None or not acc or self.last[0][0] != acc[0]:
            return []
        toks, ch, _ = self.last
        best: list[int] = []

        def dfs(path):
            nonlocal best
            if len(path) > len(best):
                best = list(path)
            if len(path) == len(acc):
                return True
            return any(dfs(path + [c]) for c in ch[path[-1]] if toks[c] == acc[len(path)])

        dfs([0])
        return best

    def commit(self, tokens, hidden, nxt):
        acc = [int(t) for t in tokens.tolist()]
        path = self._match(acc)
        fed = [i for i in path if i < self.last[2]] if path else []           # a prefix: nodes with K/V
        base = len(self.ctx)
        self.ctx += acc
        if len(fed) > 1:
            dev = self.model.device
            self.model.keep(base + torch.tensor(fed, device=dev), torch.arange(base, base + len(fed), device=dev))
        if self.n_cached == base:                                             # set by propose: ctx all cached
            self.n_cached = base + len(fed)
        self.last = None

    def rollback(self, n: int) -> None:
        """Forget committed context beyond the first n tokens (hierarchical drafting)."""
        self.ctx = self.ctx[:n]
        self.n_cached = min(self.n_cached, n)
        self.last = None
