"""The static-shape steps the GPU runs as CUDA graphs, checked eagerly on CPU: padded rows change nothing
real rows compute, the in-graph tree walk equals the reference verifier, the K/V move equals keep()."""
import pytest
import torch

from specq.models.config import ModelConfig
from specq.models.llama import Transformer, block_mask
from specq.sampling import SamplingParams, probs
from specq.spec.base import Draft
from specq.spec.eagle import EagleHead, EagleProposer
from specq.spec.graphs import BUCKETS, TreeRunner, bucket, move_path, tree_inputs, walk
from specq.spec.verify import verify

pytestmark = pytest.mark.usefixtures("one_thread")
V = 48


def tiny(vocab=V, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512)
    return Transformer(cfg).eval()


def random_tree(n, g, vocab=V, dup=False):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    toks = torch.randint(0, 4 if dup else vocab, (n,), generator=g)   # dup: many equal siblings
    return Draft(toks, torch.tensor(parents))


def filled(model, S, P, g):
    model.setup_cache(S)
    ctx = torch.randint(0, V, (P,), generator=g)
    pos = torch.arange(P)
    model(ctx, pos, pos, block_mask(0, torch.ones(P, P, dtype=torch.bool).tril(), S))
    return [(l.self_attn.cache.k.clone(), l.self_attn.cache.v.clone()) for l in model.layers]


def restore(model, saved):
    for l, (k, v) in zip(model.layers, saved):
        l.self_attn.cache.k.copy_(k)
        l.self_attn.cache.v.copy_(v)


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 9, 33, 60, 64, 65, 300)] == [1, 2, 4, 8, 16, 48, 64, 64, 80, 300]
    assert all(b in BUCKETS for b in (1, 64, 256))


def test_tree_inputs_padding():
    g = torch.Generator().manual_seed(0)
    d = random_tree(6, g)
    S, L, M = 40, 7, 8
    anc = torch.ones(M, M, dtype=torch.bool)                    # garbage outside [:n, :n] must be ignored
    anc[:6, :6] = d.ancestor_mask()
    depth = torch.full((M,), 9)
    depth[:6] = d.depths()
    pos, slots, mask, anc2 = tree_inputs(torch.tensor([L]), depth, anc, torch.tensor([6]), S)
    assert torch.equal(mask[:6], block_mask(L, d.ancestor_mask(), S)[:, :S])
    assert torch.equal(slots, torch.tensor([7, 8, 9, 10, 11, 12, S - 1, S - 1]))
    assert torch.equal(pos[:6], L + d.depths())
    assert torch.equal(mask[6:], torch.zeros(2, S, dtype=torch.bool).index_fill_(1, torch.tensor([S - 1]), True))
    assert not anc2[6:].any() and not anc2[:, 6:].any()


@torch.no_grad()
@pytest.mark.parametrize("rule", [None, "greedy", "target"])
def test_padded_tree_step_equals_exact(rule):
    """A draft of n nodes padded to its bucket gives the exact forward's logits, hidden, walk, cache."""
    model = tiny()
    g = torch.Generator().manual_seed(1)
    S, P = 96, 11
    saved = filled(model, S, P, g)
    exact, padded = TreeRunner(model, graphs=False, pad=False), TreeRunner(model, graphs=False, pad=True)
    sp = SamplingParams() if rule != "target" else SamplingParams(0.9, top_k=20)
    for trial, n in enumerate((1, 3, 5, 13, 21)):
        d = random_tree(n, g)
        args = (d.tokens, d.parents, d.depths(), d.ancestor_mask(), P)
        outs, caches = [], []
        for r in (exact, padded):
            restore(model, saved)
            gen = torch.Generator().manual_seed(trial)
            outs.append(r.tree(*args, rule=rule, sp=sp, gen=gen) if rule else r.tree(*args))
            caches.append([(l.self_attn.cache.k[:, :S - 1].clone(), l.self_attn.cache.v[:, :S - 1].clone())
                           for l in model.layers])
        (l0, h0, r0, i0, _), (l1, h1, r1, i1, _) = outs
        assert l1.shape[0] == bucket(n) and l0.shape[0] == n
        torch.testing.assert_close(l1[:n], l0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h1[:n], h0, atol=1e-5, rtol=1e-5)
        for (k0, v0), (k1, v1) in zip(*caches):               # everything but the scratch slot
            torch.testing.assert_close(k1, k0, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)
        if rule:
            a = int(r0[0])
            assert r1[:a + 2].tolist() == r0[:a + 2].tolist() and i1[:a].tolist() == i0[:a].tolist()
            if rule == "greedy":     # the walk equals the reference verifier on the same logits
                path, tok = verify(d, probs(l0, sp), "greedy")
                assert [0] + path == i0[:a].tolist() and tok == int(r0[1])
                assert r0[3:2 + a].tolist() == d.tokens[path].tolist()


def test_walk_equals_reference_with_equal_siblings():
    """Trees with many equal sibling tokens; the target's choice depends only on the tokens of the path
    (as a model's does). Both walks emit a prefix of the one greedy continuation; the graph walk takes
    the deepest matching path, so it emits at least as many tokens as the reference (first match)."""
    g = torch.Generator().manual_seed(2)
    for trial in range(200):
        n = int(torch.randint(1, 24, (1,), generator=g))
        d = random_tree(n, g, dup=True)
        par, tok_l = d.parents.tolist(), d.tokens.tolist()

        def choice(i):   # deterministic in the token path root..i
            path = []
            while i >= 0:
                path.append(tok_l[i])
                i = par[i]
            return hash((trial, tuple(path[::-1]))) % 4
        t = torch.tensor([choice(i) for i in range(n)])
        res, idx = walk(d.tokens, d.parents, d.depths(), d.ancestor_mask(), torch.tensor([n]), t)
        path, tok = verify(d, torch.nn.functional.one_hot(t, 4).float(), "greedy")
        a = int(res[0])
        ref, got = d.tokens[path].tolist() + [tok], res[3:2 + a].tolist() + [int(res[1])]
        assert len(got) >= len(ref) and got[:len(ref)] == ref
        nodes = idx[:a].tolist()
        assert nodes[0] == 0 and all(par[nodes[i]] == nodes[i - 1] for i in range(1, a))
        assert all(tok_l[nodes[i]] == int(t[nodes[i - 1]]) for i in range(1, a))
        assert int(res[1]) == int(t[nodes[-1]])
        assert idx[a:].tolist() == list(range(a, n))              # the rest of the move is a no-op


@torch.no_grad()
def test_move_path_equals_keep():
    model = tiny()
    g = torch.Generator().manual_seed(3)
    S, P, n = 64, 9, 12
    filled(model, S, P, g)
    d = random_tree(n, g)
    model(d.tokens, P + d.depths(), torch.arange(P, P + n), block_mask(P, d.ancestor_mask(), S))
    saved = [(l.self_attn.cache.k.clone(), l.self_attn.cache.v.clone()) for l in model.layers]
    leaf = n - 1
    path = [leaf]
    while int(d.parents[path[-1]]) > 0:
        path.append(int(d.parents[path[-1]]))
    acc = torch.tensor([0] + path[::-1])
    model.keep(P + acc, P + torch.arange(acc.shape[0]))
    want = [(l.self_attn.cache.k[:, :P + len(acc)].clone(), l.self_attn.cache.v[:, :P + len(acc)].clone())
            for l in model.layers]
    restore(model, saved)
    idx = torch.arange(n)
    idx[:len(acc)] = acc
    move_path(model, torch.tensor([P]), idx)
    for l, (k, v) in zip(model.layers, want):
        assert torch.equal(l.self_attn.cache.k[:, :P + len(acc)], k)
        assert torch.equal(l.self_attn.cache.v[:, :P + len(acc)], v)


@torch.no_grad()
def test_padded_forward_equals_exact():
    model = tiny()
    g = torch.Generator().manual_seed(4)
    S, P = 64, 10
    saved = filled(model, S, P, g)
    ids = torch.randint(0, V, (3,), generator=g)
    slots = torch.tensor([P, P + 1, P + 2])
    mask = block_mask(P, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool), S)
    outs = []
    for pad in (False, True):
        restore(model, saved)
        lg, h = TreeRunner(model, graphs=False, pad=pad).forward(ids, P + torch.tensor([0, 1, 1]), slots, mask, P + 2)
        outs.append((lg.clone(), h.clone(), model.layers[1].self_attn.cache.k[:, :S - 1].clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_eagle_padded_append_equals_exact():
    """The head's commit padded to a bucket writes the same cache and outputs as the exact one."""
    target = tiny()
    head = EagleHead(target.cfg).bind(target).eval()
    g = torch.Generator().manual_seed(5)
    prop = EagleProposer(head, target, top_k=3, depth=2, total_tokens=8, graphs=False)
    prop.setup(64)
    D = target.cfg.hidden_size
    prop.prefill(torch.randint(0, V, (7,), generator=g), torch.randn(7, D, generator=g), 5)
    ids, feats = torch.randint(0, V, (3,), generator=g), torch.randn(3, D, generator=g)
    c = head.layers[0].self_attn.cache
    k0, o0 = c.k.clone(), head.outs.clone()
    prop._append_fn(ids, feats, torch.tensor([7]), torch.tensor([3]))
    want_k, want_o = c.k[:, :10].clone(), head.outs[:10].clone()
    c.k.copy_(k0)
    head.outs.copy_(o0)
    pad_ids = torch.cat([ids, torch.randint(0, V, (5,), generator=g)])
    pad_feats = torch.cat([feats, torch.randn(5, D, generator=g)])
    prop._append_fn(pad_ids, pad_feats, torch.tensor([7]), torch.tensor([3]))
    torch.testing.assert_close(c.k[:, :10], want_k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(head.outs[:10], want_o, atol=1e-6, rtol=1e-6)
    d = prop.propose(4)                                      # depths / ancestors come with the draft
    assert torch.equal(d.depth, Draft(d.tokens, d.parents).depths())
    assert torch.equal(d.anc, Draft(d.tokens, d.parents).ancestor_mask())


@torch.no_grad()
def test_captured_steps_never_touch_host_data(monkeypatch):
    """What runs inside CUDA graphs must not read tensor values on the host (.item(), nonzero, bool masks):
    on the meta device any such read raises, so running the steps there proves they are capturable.
    Nor may it write host values: `t[i] = number` copies a CPU scalar on CUDA (fails under capture)."""
    setitem = torch.Tensor.__setitem__

    def strict_setitem(self, idx, value):
        assert torch.is_tensor(value), f"host value {value!r} written into a tensor inside a graph step"
        return setitem(self, idx, value)
    monkeypatch.setattr(torch.Tensor, "__setitem__", strict_setitem)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    with torch.device("meta"):
        m = Transformer(cfg)
        m.setup_cache(128)
        r = TreeRunner(m, graphs=False, pad=True)
        for rule in (None, "greedy", "target"):
            out = r._tree_fn(r._bufs(64, 64), rule, SamplingParams(0.8, top_k=5, top_p=0.9))
            assert out[0].shape == (64, 64) and (rule is None or out[2].shape == (66,))
        assert r._fwd_fn(r._bufs(8, fwd=True))[0].shape == (8, 64)
        p = EagleProposer(EagleHead(cfg).bind(m), m, top_k=4, depth=3, total_tokens=20, graphs=False)
        p.setup(64)
        z = torch.zeros(1, dtype=torch.long)
        p._append_fn(torch.zeros(8, dtype=torch.long), torch.zeros(8, 32), z, z)
        assert [tuple(o.shape) for o in p._grow_fn(z, z + 1)] == [(20,), (20,), (20,), (20, 20)]


@torch.no_grad()
def test_compiled_runner_equals_eager():
    """TreeRunner(compile=True): the torch.compile'd tree step (one symbolic row count) and forward give the eager
    runner's logits, walk and cache."""
    model = tiny()
    g = torch.Generator().manual_seed(3)
    S, P = 96, 11
    saved = filled(model, S, P, g)
    eager, comp = TreeRunner(model, graphs=False, pad=True), TreeRunner(model, graphs=False, pad=True, compile=True)
    for n in (1, 3, 6, 11):
        d = random_tree(n, g)
        args = (d.tokens, d.parents, d.depths(), d.ancestor_mask(), P)
        outs, caches = [], []
        for r in (eager, comp):
            restore(model, saved)
            outs.append(r.tree(*args, rule="greedy"))
            caches.append([l.self_attn.cache.k[:, :S - 1].clone() for l in model.layers])
        (l0, h0, r0, i0, _), (l1, h1, r1, i1, _) = outs
        torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h1, h0, atol=1e-4, rtol=1e-4)
        a = int(r0[0])
        assert r1[:a + 2].tolist() == r0[:a + 2].tolist() and i1[:a].tolist() == i0[:a].tolist()
        for k0, k1 in zip(*caches):
            torch.testing.assert_close(k1, k0, atol=1e-4, rtol=1e-4)
    restore(model, saved)
    ids, slots = torch.tensor([3, 4, 5]), P + torch.arange(3)
    mask = block_mask(P, torch.ones(3, 3, dtype=torch.bool).tril(), S)
    f0 = eager.forward(ids, slots, slots, mask, P + 2)
    f1 = comp.forward(ids, slots, slots, mask, P + 2)
    torch.testing.assert_close(f1[0], f0[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_compiled_blocks_runner_equals_eager(monkeypatch):
    """TreeRunner(compile=True) under regional compilation (specq.models.llama.COMPILE_BLOCKS, the CLI's
    --compile-blocks): the model's layers compiled in place, the step eager; same logits, walk and cache as the
    eager runner (whose outputs are taken before the layers are compiled)."""
    from specq.models import llama
    model = tiny()
    g = torch.Generator().manual_seed(4)
    S, P = 96, 11
    saved = filled(model, S, P, g)
    trees = [random_tree(n, g) for n in (1, 4, 9)]
    eager = TreeRunner(model, graphs=False, pad=True)
    ref = []
    for d in trees:
        restore(model, saved)
        ref.append(eager.tree(d.tokens, d.parents, d.depths(), d.ancestor_mask(), P, rule="greedy"))
    monkeypatch.setattr(llama, "COMPILE_BLOCKS", True)
    torch._dynamo.reset()
    comp = TreeRunner(model, graphs=False, pad=True, compile=True)
    assert all(hasattr(blk, "_compiled_call_impl") and blk._compiled_call_impl is not None for blk in model.layers)
    for d, (l0, h0, r0, i0, _) in zip(trees, ref):
        restore(model, saved)
        l1, h1, r1, i1, _ = comp.tree(d.tokens, d.parents, d.depths(), d.ancestor_mask(), P, rule="greedy")
        torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h1, h0, atol=1e-4, rtol=1e-4)
        a = int(r0[0])
        assert r1[:a + 2].tolist() == r0[:a + 2].tolist() and i1[:a].tolist() == i0[:a].tolist()
    torch._dynamo.reset()
