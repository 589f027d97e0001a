"""Hierarchical proposer (SpecMQuant): tree drafter -> intermediate model -> linear draft for the target.

Each propose(): repeat { tree_proposer drafts a tree; the intermediate model verifies it (one forward,
tree mask, the same verify() as the target); its accepted path and its own bonus token extend a
linear draft } until the linear draft has >= min_draft_length tokens (or max_iters trees).
The target then verifies a chain, which quantized kernels handle cheaply.

Losslessness at T > 0: the intermediate's verification is lossless, so the linear draft is a sample
of the intermediate's own autoregressive distribution: token j+1 has law p_int(. | context, draft[:j+1])
given the draft so far, whatever the tree drafter did. Its q row is therefore the intermediate's
probs at that node, and chain speculative sampling against the target is exact. Where the draft
stops is decided only by how earlier tokens were produced (accepted vs. bonus), never by the
value of a token not yet emitted, so the stopping rule does not bias the drafts it keeps.

State: the intermediate caches context + draft (its K/V layout mirrors the target's); the tree
proposer sees the draft as committed context and is rolled back (rollback(n)) to what the target
accepts, then re-committed with the target's next token. A fully accepted draft leaves its last token without intermediate K/V: it is run (with
the tree proposer's commit) at the start of the next propose().
"""
from __future__ import annotations

import torch

from ..errors import SpecqError
from ..models.llama import Transformer, causal_mask
from ..sampling import probs
from .base import Draft, Proposer


class HierProposer(Proposer):
    name = "hier"

    def __init__(self, intermediate: Transformer, tree_proposer: Proposer, min_draft_length: int = 6,
                 max_iters: int | None = None, verify_method: str | None = None):
        if not isinstance(min_draft_length, int) or isinstance(min_draft_length, bool) or min_draft_length < 1:
            raise SpecqError(f"invalid min_draft_length={min_draft_length!r}: must be an integer >= 1")
        max_iters = min_draft_length if max_iters is None else max_iters
        if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
            raise SpecqError(f"invalid max_iters={max_iters!r}: must be an integer >= 1")
        if not hasattr(tree_proposer, "rollback"):
            raise SpecqError(f"proposer {getattr(tree_proposer, 'name', tree_proposer)!r} cannot be used "
                             "inside the hierarchical proposer (it has no rollback)")
        self.intermediate, self.tree_proposer = intermediate, tree_proposer
        self.min_len, self.max_iters, self.verify_method = min_draft_length, max_iters, verify_method
        self.tree_nodes = int(getattr(tree_proposer, "max_nodes", 64))
        # chain: root + (< min_len drafts before the last tree) + (<= tree_nodes from the last tree)
        self.max_nodes = min_draft_length + self.tree_nodes
        self._gen = None
        self.ctx: list[int] = []     # committed context (root excluded)
        self.n_cached = 0            # ctx[:n_cached] have K/V in the intermediate cache
        self.chain_len = 0           # nodes of the last linear draft (root included)
        self.chain_h = None          # [chain_len-1, D] intermediate features at chain[:-1]
        self.n_steps = self.n_trees = self.n_inter = 0

    @property
    def generator(self):
        return self._gen

    @generator.setter
    def generator(self, g):
        self._gen = g
        if hasattr(self.tree_proposer, "generator"):
            self.tree_proposer.generator = g

    def setup(self, size: int) -> None:
        from ..engine import ensure_cache
        from .graphs import bucket
        ensure_cache(self.intermediate, size + bucket(self.tree_nodes) + 1)   # + padding and scratch slot
        if hasattr(self.tree_proposer, "setup"):
            self.tree_proposer.setup(size + self.tree_nodes)

    @torch.no_grad()
    def prefill(self, prompt, hidden, first):
        M, dev = self.intermediate, self.intermediate.device
        P = prompt.shape[0]
        if M.cache_size < P + self.max_nodes + self.tree_nodes:
            self.setup(2 * (P + self.max_nodes))
        pos = torch.arange(P, device=dev)
        _, h = M(prompt.to(dev), pos, pos, causal_mask(0, P, M.cache_size, dev), logits_rows=slice(P - 1, P))
        self.ctx, self.n_cached, self.chain_len = [int(t) for t in prompt.tolist()], P, 0
        self.n_steps = self.n_trees = self.n_inter = 0
        self.tree_proposer.prefill(prompt, h, first)

    @torch.no_grad()
    def propose(self, root: int, sp) -> Draft:
        from ..engine import step_tree
        M, dev, tp = self.intermediate, self.intermediate.device, self.tree_proposer
        base = len(self.ctx)
        if M.cache_size < base + self.max_nodes + self.tree_nodes:
            raise SpecqError("hierarchical draft does not fit the intermediate cache (call setup())")
        if self.n_cached < base:                 # last draft fully accepted: its last token lacks K/V
            st = self.n_cached
            ids = torch.tensor(self.ctx[st:], device=dev)
            pos = torch.arange(st, base, device=dev)
            mask = causal_mask(st, base - st, M.cache_size, dev)
            if base - st <= 8:                   # usually one token: a CUDA-graph bucket on GPU
                from .graphs import runner_for
                h = runner_for(M).forward(ids, pos, pos, mask, base - 1)[1]
            else:
                _, h = M(ids, pos, pos, mask, logits_rows=slice(0, 0))
            tp.commit(ids, h, root)
            self.n_cached = base
        chain, qrows, hrows, L = [root], [], [], base
        for _ in range(self.max_iters):
            if len(chain) - 1 >= self.min_len:
                break
            d = tp.propose(chain[-1], sp)
            new, acc, toks, h, logits = step_tree(M, d, L, sp, self.verify_method, self.generator)
            qrows.append(probs(logits[acc], sp))                              # [a, V] intermediate probs
            hrows.append(h[acc])                                              # [a, D] intermediate features
            chain += new
            tp.commit(toks[acc], hrows[-1], new[-1])
            L += acc.shape[0]
            self.n_trees += 1
            self.n_inter += acc.shape[0]
        q = torch.cat(qrows + [torch.zeros_like(qrows[0][:1])])              # [n, V]; the last node is a leaf
        self.chain_len, self.chain_h = len(chain), torch.cat(hrows)          # features of chain[:-1]
        self.n_steps += 1
        n = len(chain)
        return Draft(torch.tensor(chain, device=dev), torch.arange(-1, n - 1), q, "iid")

    def commit(self, tokens, hidden, nxt):
        a = tokens.shape[0]
        base = len(self.ctx)
        self.ctx += [int(t) for t in tokens.tolist()]
        if a < self.chain_len:
            # the target replaced chain[a] by nxt: the tree proposer keeps chain[:a-1] and re-commits
            # chain[a-1] (intermediate feature) followed by nxt, as after any ordinary step
            self.n_cached = base + a
            self.tree_proposer.rollback(base + a - 1)
            self.tree_proposer.commit(tokens[a - 1:], self.chain_h[a - 1:a], nxt)
        else:                                    # all accepted: chain[-1] has no intermediate K/V yet
            self.n_cached = base + a - 1
            self.tree_proposer.rollback(base + a - 1)

    def rollback(self, n: int) -> None:
        self.ctx = self.ctx[:n]
        self.n_cached = min(self.n_cached, n)
        self.tree_proposer.rollback(min(n, self.n_cached))

    def stats(self) -> dict:
        """Counts (additive across generations): intermediate tau = hier_inter_tokens / hier_trees."""
        return {"hier_trees": self.n_trees, "hier_inter_tokens": self.n_inter}
