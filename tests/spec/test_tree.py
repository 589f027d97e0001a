import hashlib

import numpy as np
import pytest
import torch

from specq.errors import SpecqError
from specq.spec.base import Draft
from specq.spec.tree import ancestor_mask, grow, leaf_paths, positions, select, static_tree


def fake_logp(path: tuple, V: int) -> torch.Tensor:
    """A deterministic 'draft model': log-probabilities that depend on the whole path."""
    seed = int(hashlib.sha256(repr(path).encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(V, generator=g) * 2.0, -1)


def run_grow(V, k, depth, total):
    root = 3
    state = {"paths": None}

    def step(toks, parent_pos):
        if parent_pos is None:
            paths = [(int(t),) for t in toks]
        else:
            paths = [state["paths"][p] + (int(t),) for p, t in zip(parent_pos.tolist(), toks)]
        state["paths"] = paths
        return torch.stack([fake_logp(p, V) for p in paths])

    return grow(root, fake_logp((), V), step, k, depth, total)


def brute_force(V, k, depth, total):
    """EAGLE-2 by definition, on explicit paths, float32 sums in the same order."""
    def topk(lp):
        return sorted(range(V), key=lambda t: (-lp[t], t))[:k]
    lp = fake_logp((), V).numpy()
    beams = [((t,), np.float32(lp[t])) for t in topk(lp)]
    cands = list(beams)
    for _ in range(depth):
        children = []
        for path, s in beams:
            lp = fake_logp(path, V).numpy()
            children += [(path + (t,), np.float32(s + np.float32(lp[t]))) for t in topk(lp)]
        cands += children
        beams = sorted(children, key=lambda c: -c[1])[:k]
    order = sorted(range(len(cands)), key=lambda i: (-cands[i][1], i))[:total - 1]
    return {cands[i][0]: float(cands[i][1]) for i in order}, cands


def node_paths(tokens, parents):
    par, tok = parents.tolist(), tokens.tolist()
    out = []
    for i in range(len(par)):
        p, j = [], i
        while par[j] >= 0:
            p.append(tok[j])
            j = par[j]
        out.append(tuple(p[::-1]))
    return out


@pytest.mark.parametrize("V,k,depth,total", [(50, 4, 3, 20), (30, 5, 4, 60), (12, 3, 2, 100), (200, 10, 5, 60)])
def test_grow_matches_brute_force(V, k, depth, total):
    tokens, parents, scores = run_grow(V, k, depth, total)
    want, cands = brute_force(V, k, depth, total)
    assert len(tokens) == min(total, len(cands) + 1)
    assert tokens[0] == 3 and parents[0] == -1
    # topological order, valid parents: every kept node's ancestors are kept
    assert all(0 <= p < i for i, p in enumerate(parents.tolist()) if i > 0)
    paths = node_paths(tokens, parents)
    got = dict(zip(paths[1:], scores[1:].tolist()))
    assert set(got) == set(want)
    for p, s in got.items():
        assert s == pytest.approx(want[p], abs=1e-5)
        # a node's score is its path's cumulative log-probability
        assert s == pytest.approx(sum(float(fake_logp(p[:i], V)[p[i]]) for i in range(len(p))), abs=1e-4)
    # nothing left out scores better than what was kept
    left = [float(s) for c, s in cands if c not in got]
    if left:
        assert max(left) <= min(got.values()) + 1e-6


def test_select_ties_keep_parents_first():
    s = torch.tensor([-1.0, -1.0, -2.0, -1.0, -0.5])
    assert select(s, 3).tolist() == [0, 1, 4]
    assert select(s, 10).tolist() == [0, 1, 2, 3, 4]


def test_zero_logprob_child_keeps_parent():
    # a child with log-probability 0 ties with its parent; the parent must still be kept
    V = 6
    def step(toks, pp):
        lp = torch.full((len(toks), V), -30.0)
        lp[:, 0] = 0.0
        return lp
    root_lp = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]), -1)
    tokens, parents, scores = grow(7, root_lp, step, 2, 3, 5)
    assert all(0 <= p < i for i, p in enumerate(parents.tolist()) if i > 0)
    assert len(tokens) == 5


def test_mask_positions_paths_match_draft():
    g = torch.Generator().manual_seed(0)
    par = [-1]
    for i in range(1, 40):
        par.append(int(torch.randint(0, i, (1,), generator=g)))
    parents = torch.tensor(par)
    d = Draft(torch.arange(40), parents)
    assert torch.equal(ancestor_mask(parents), d.ancestor_mask())
    assert torch.equal(positions(parents), d.depths())
    lp = leaf_paths(parents)
    ch = d.children()
    leaves = [i for i in range(40) if not ch[i]]
    assert lp.shape[0] == len(leaves)
    for row in lp.tolist():
        row = [r for r in row if r >= 0]
        assert row[0] == 0 and not ch[row[-1]]
        assert all(par[b] == a for a, b in zip(row, row[1:]))


def test_static_tree():
    parents, rank = static_tree([[0, 1], [0], [1], [0, 0], [0, 0, 0]])
    assert parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert rank.tolist() == [-1, 0, 1, 0, 1, 0]
    with pytest.raises(SpecqError):
        static_tree([[0, 1]])
