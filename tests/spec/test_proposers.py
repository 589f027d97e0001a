"""Proposers: drafts follow the draft model exactly (q rows == cache-free recomputation) while caches are
kept in sync through accepts, rejects and rollbacks; tree shapes; n-gram lookup; hierarchical chains."""
import copy

import pytest
import torch

from specq.engine import SpecEngine
from specq.errors import SpecqError
from specq.models.config import ModelConfig
from specq.models.llama import Transformer, causal_mask
from specq.sampling import SamplingParams, probs
from specq.spec import multi
from specq.spec.draft_model import DraftModelProposer
from specq.spec.hier import HierProposer
from specq.spec.ngram import NgramProposer

V = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed, sharp=3.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      max_position_embeddings=2048)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharp)
    return m


def noisy(m, s, seed):
    g = torch.Generator().manual_seed(seed)
    d = copy.deepcopy(m)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(s * p.std() * torch.randn(p.shape, generator=g))
    return d


@torch.inference_mode()
def naive_probs(model, seq, sp):  # probs of the token after seq, no cache reuse
    n = len(seq)
    model.setup_cache(n)
    pos = torch.arange(n)
    return probs(model(torch.tensor(seq), pos, pos, causal_mask(0, n, n), return_hidden=False)[-1], sp)


class Checked:
    """Wraps a proposer; on every propose checks each non-leaf node's q against the reference model
    run from scratch on context + the node's ancestor path. The context is tracked independently."""

    def __init__(self, inner, ref, sp):
        self.inner, self.ref, self.sp, self.ctx, self.checked = inner, ref, sp, [], 0
        self.max_nodes = inner.max_nodes

    def __getattr__(self, k):  # setup, generator, rollback, ... pass through
        return getattr(self.inner, k)

    def __setattr__(self, k, v):
        if k == "generator":
            self.inner.generator = v
        else:
            object.__setattr__(self, k, v)

    def prefill(self, prompt, hidden, first):
        self.ctx = prompt.tolist()
        self.inner.prefill(prompt, hidden, first)

    def commit(self, tokens, hidden, nxt):
        self.ctx += tokens.tolist()
        self.inner.commit(tokens, hidden, nxt)

    def rollback(self, n):
        self.ctx = self.ctx[:n]
        self.inner.rollback(n)

    def propose(self, root, sp):
        d = self.inner.propose(root, sp)
        toks, par, kids = d.tokens.tolist(), d.parents.tolist(), d.children()
        assert toks[0] == root and par[0] == -1 and all(0 <= par[i] < i for i in range(1, len(d)))
        for i in range(len(d)):
            if not kids[i]:
                continue
            path, j = [], i
            while j >= 0:
                path.append(toks[j])
                j = par[j]
            ref = naive_probs(self.ref, self.ctx + path[::-1], sp)
            torch.testing.assert_close(d.q[i], ref, atol=2e-4, rtol=1e-3)
            if sp.greedy:
                assert int(ref.argmax()) in {toks[c] for c in kids[i]}
            self.checked += 1
        return d


@pytest.mark.parametrize("sp", [SamplingParams(), SamplingParams(1.0), SamplingParams(0.7, top_k=5)])
@pytest.mark.parametrize("shape", [(3, 1, "iid"), (2, 3, "iid"), (3, 2, "spechub"), (3, 3, "wo")])
def test_draft_model_q_matches_model_through_commits(sp, shape):
    t = tiny(0)
    d = noisy(t, 0.4, 1)
    k, n, scheme = shape
    prop = Checked(DraftModelProposer(copy.deepcopy(d), k=k, n_drafts=n, scheme=scheme, branch_depth=1), d, sp)
    eng = SpecEngine(t, prop, sp, seed=1)
    for prompt in ([1, 2, 3], [5] * 9):
        out, m = eng.generate(prompt, 25)
        assert len(out) == 25
    assert prop.checked > 20 and m.drafted > 0


def test_tree_shapes():
    assert multi.level_widths(4, 2, 4) == [1, 2, 4, 8, 16]                  # SpecHub's 31-node binary tree
    assert multi.level_widths(5, 3, 1) == [1, 3, 3, 3, 3, 3]
    assert sum(multi.level_widths(6, 2, multi.default_branch(6, 2))) <= 64
    p = DraftModelProposer(tiny(0), k=4, n_drafts=2)
    assert p.max_nodes == 31 and p.name == "multi-iid"
    t = tiny(0)
    SpecEngine(t, p, SamplingParams(1.0), seed=0).generate([1, 2], 2)
    d = p.propose(7, SamplingParams(1.0))
    assert len(d) == 31 and d.depths().tolist() == [0] + [1] * 2 + [2] * 4 + [3] * 8 + [4] * 16
    assert d.q.shape == (31, V) and torch.all(d.q[15:] == 0) and torch.allclose(d.q[:15].sum(-1), torch.ones(15))
    g = DraftModelProposer(tiny(0), k=2, n_drafts=3)
    SpecEngine(t, g, SamplingParams()).generate([1, 2], 2)
    d = g.propose(7, SamplingParams())
    kids = d.children()
    assert all(len(set(d.tokens[kids[i]].tolist())) == 3 for i in range(4))   # greedy siblings: distinct top-3
    for bad in (dict(k=0), dict(n_drafts=0), dict(scheme="x"), dict(n_drafts=3, scheme="spechub"), dict(branch_depth=9)):
        with pytest.raises(SpecqError):
            DraftModelProposer(t, **{"k": 2, **bad})


def test_ngram_lookup():
    p = NgramProposer(k=3, max_ngram=3, min_ngram=1)
    p.prefill(torch.tensor([5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6]), None, 7)
    d = p.propose(7, SamplingParams())
    # last 3-gram (5 6 7) occurs at 0 and 6: the most recent (6) continues with 2 3 5
    assert d.tokens.tolist() == [7, 2, 3, 5] and d.q is None and d.parents.tolist() == [-1, 0, 1, 2]
    p.commit(torch.tensor([7, 2]), None, 4)
    assert p.propose(4, SamplingParams()).tokens.tolist() == [4]             # "4" never seen: root only
    p.commit(torch.tensor([4]), None, 9)
    assert p.propose(9, SamplingParams()).tokens.tolist() == [9, 1, 5, 6]    # 1-gram fallback
    p.rollback(3)
    assert p.propose(5, SamplingParams()).tokens.tolist() == [5, 6, 7, 5]    # context 5 6 7 + root 5
    long = NgramProposer(k=2)
    long.prefill(torch.arange(1000) % 7, None, 0)                            # buffer growth
    long.commit(torch.arange(500) % 7, None, 3)
    assert long.propose(3, SamplingParams()).tokens.tolist() == [3, 4, 5]
    with pytest.raises(SpecqError):
        NgramProposer(k=2, max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("sp", [SamplingParams(), SamplingParams(1.0)])
def test_hier_chain_q_is_intermediate_and_tree_stays_in_sync(sp):
    t = tiny(0)
    inter = noisy(t, 0.3, 2)
    dm = noisy(t, 0.6, 3)
    tree = Checked(DraftModelProposer(copy.deepcopy(dm), k=2, n_drafts=2, scheme="iid"), dm, sp)
    hier = Checked(HierProposer(copy.deepcopy(inter), tree, min_draft_length=5), inter, sp)
    eng = SpecEngine(t, hier, sp, seed=3)
    for prompt in ([3, 1, 4, 1, 5], [9, 9]):
        out, m = eng.generate(prompt, 30)
        assert len(out) == 30
    assert hier.checked > 10 and tree.checked > 10
    s = m.summary()
    assert s["hier_trees"] >= m.steps and s["hier_inter_tokens"] >= s["hier_trees"]
    # every linear draft reached min_draft_length (max_iters defaults to it) unless truncated by nothing
    assert m.drafted >= 5 * m.steps


def test_hier_needs_rollback():
    class NoRollback:
        max_nodes = 4
    with pytest.raises(SpecqError, match="rollback"):
        HierProposer(tiny(0), NoRollback())


def test_hier_with_eagle_tree_greedy_and_sampled():
    eagle = pytest.importorskip("specq.spec.eagle")
    t = tiny(0)
    inter = noisy(t, 0.2, 4)
    ref, _ = SpecEngine(t, None, SamplingParams()).generate([2, 7, 1, 8], 30)
    head = eagle.EagleHead(inter.cfg).bind(inter).eval()
    hier = HierProposer(inter, eagle.EagleProposer(head, inter, top_k=3, depth=3, total_tokens=10), min_draft_length=4)
    out, m = SpecEngine(t, hier, SamplingParams()).generate([2, 7, 1, 8], 30)
    assert out == ref and m.tau > 1.0
    out, m = SpecEngine(t, hier, SamplingParams(1.0), seed=0).generate([2, 7, 1, 8], 30)
    assert len(out) == 30 and m.steps < 30


def test_hier_over_ngram_trees():
    """A tree proposer that often returns the root alone (n-gram misses) still builds full chains."""
    t = tiny(0)
    ref, _ = SpecEngine(t, None, SamplingParams()).generate([4, 4, 4, 2], 25)
    hier = HierProposer(noisy(t, 0.2, 5), NgramProposer(k=2), min_draft_length=3)
    out, m = SpecEngine(t, hier, SamplingParams()).generate([4, 4, 4, 2], 25)
    assert out == ref and m.drafted >= 3 * m.steps
