"""Statistical tests of the lossless verifiers: the emitted tokens must follow the target exactly.

A toy "language model" is a table of next-token distributions indexed by the whole history
(P[d] has shape [V]*d + [V]); the draft model Q is another such table. spec_run() decodes the first
two tokens speculatively, in as many rounds as it takes, for B independent sequences at once
through verify_batch (the same code verify() runs), and the chi-square tests compare the first
token with P[0] and the first two with P[0](x) P[1][x](y).
"""
import pytest
import torch
from scipy.stats import chisquare

from specq.errors import SpecqError
from specq.sampling import SamplingParams, probs
from specq.spec import verify as vmod
from specq.spec.base import Draft
from specq.spec.verify import sample_children, verify, verify_batch

V = 6
ALPHA = 1e-3
SHAPES = {
    "chain": [-1, 0, 1, 2],
    "binary": [-1, 0, 0, 1, 1, 2, 2],
    "wide": [-1, 0, 0, 0, 1, 2, 3],
}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- toy models

def tables(kind: str, L: int, gen: torch.Generator, v: int = V):
    """Target and draft tables P, Q: lists of L+1 tensors, P[d] [v]*d + [v]."""
    P, Q = [], []
    for d in range(L + 1):
        shape = [v] * d + [v]
        zp = torch.randn(shape, generator=gen) * 1.5
        zq = zp + torch.randn(shape, generator=gen)              # draft = noisy target
        p, q = zp.softmax(-1), zq.softmax(-1)
        if kind == "q_zeros":                                    # q misses tokens that p has
            q = q * (torch.rand(shape, generator=gen) > 0.4)
            q[..., 0] += (q.sum(-1) == 0).float()
            q = q / q.sum(-1, keepdim=True)
        elif kind == "p_eq_q":
            q = p.clone()
        elif kind == "p_onehot":
            p = probs(zp, SamplingParams(0.0))
        elif kind == "q_onehot":
            q = probs(zq, SamplingParams(0.0))
        elif kind == "topk":                                     # both truncated, different supports
            sp = SamplingParams(0.8, top_k=2)
            p, q = probs(zp, sp), probs(zq, sp)
        elif kind == "greedy":                                   # target one-hot, draft close to it
            p = probs(zp, SamplingParams(0.0))
            q = (zp * 2 + torch.randn(shape, generator=gen) * 0.5).softmax(-1)
        else:
            assert kind == "random"
        P.append(p)
        Q.append(q)
    return P, Q


def lookup(T, hist, lens):
    """T tables, hist [b, H] tokens, lens [b] history lengths -> [b, v] distributions."""
    v = T[0].shape[-1]
    flat = torch.cat([t.reshape(-1, v) for t in T])                    # all histories, by length
    offset = torch.tensor([0] + [v ** d for d in range(len(T) - 1)]).cumsum(0)
    idx = torch.zeros_like(lens)
    for i in range(hist.shape[1]):                                     # Horner over the history
        idx = torch.where(i < lens, idx * v + hist[:, i].clamp_min(0), idx)
    return flat[offset[lens] + idx]


def depth(parents):
    return ancestors(parents).ne(-1).sum(1).max().item()


def ancestors(parents):
    """[N, D] path from the root (excluded) to each node, -1 padded."""
    paths = [[]]
    for i in range(1, len(parents)):
        paths.append(paths[parents[i]] + [i])
    D = max(1, max(len(x) for x in paths))
    return torch.tensor([x + [-1] * (D - len(x)) for x in paths])


def build(P, Q, parents, scheme, em, c, gen):
    """Sample B draft trees rooted after history em[:, :c]: tokens [B, N], p, q [B, N, v]."""
    b, N = em.shape[0], len(parents)
    H = em.shape[1] + N
    hist = [torch.cat([em, em.new_full((b, N), -1)], 1)]        # per node [b, H]
    lens = [c.clone()]
    tokens = torch.full((b, N), -1, dtype=torch.long)
    tokens[:, 0] = 0                                             # the root's token is never read
    ps, qs = [], []
    kids = [[j for j in range(N) if parents[j] == i] for i in range(N)]
    rows = torch.arange(b)
    for i in range(N):
        if i > 0:
            h = hist[parents[i]].clone()
            h[rows, lens[parents[i]].clamp_max(H - 1)] = tokens[:, i]
            hist.append(h)
            lens.append(lens[parents[i]] + 1)
        ps.append(lookup(P, hist[i], lens[i]))
        qs.append(lookup(Q, hist[i], lens[i]))
        if kids[i]:
            ch = sample_children(qs[i], len(kids[i]), scheme, gen)  # [b, k]
            ch = torch.where(tokens[:, i:i + 1] >= 0, ch, -1)       # absent parent -> absent child
            tokens[:, kids[i]] = ch
    return tokens, torch.stack(ps, 1), torch.stack(qs, 1)


def spec_run(P, Q, parents, method, scheme, B, seed, ntok=2, use_q=True, verify_scheme=None):
    """Decode ntok tokens speculatively for B sequences. Returns (tokens [B, ntok], n_acc of round 1)."""
    gen = torch.Generator().manual_seed(seed)
    em = torch.full((B, ntok), -1, dtype=torch.long)
    cnt = torch.zeros(B, dtype=torch.long)
    anc = ancestors(parents)
    first_nacc = None
    while bool((cnt < ntok).any()):
        rows = (cnt < ntok).nonzero()[:, 0]
        tok, p, q = build(P, Q, parents, scheme, em[rows], cnt[rows], gen)
        last, nxt, n_acc = verify_batch(tok, parents, p, q if use_q else None, method,
                                        verify_scheme or scheme, gen)
        if first_nacc is None:
            first_nacc = n_acc
        path = anc[last]                                         # [b, D]
        ptok = torch.where(path >= 0, tok.gather(1, path.clamp_min(0)), -1)
        new = torch.cat([ptok, ptok.new_full((len(rows), 1), -1)], 1)
        new[torch.arange(len(rows)), n_acc] = nxt                # accepted drafts, then the bonus
        for j in range(new.shape[1]):
            ok = (j <= n_acc) & (cnt[rows] < ntok)
            r = rows[ok]
            em[r, cnt[r]] = new[ok, j]
            cnt[r] += 1
    return em, first_nacc


def pvalue(cats, pr):
    """Chi-square p-value of category samples cats [B] against probabilities pr [C]."""
    pr = pr.double().flatten()
    obs = torch.bincount(cats, minlength=pr.numel()).double()
    assert obs.numel() == pr.numel(), "emitted a token outside the vocabulary"
    exp = pr / pr.sum() * cats.numel()
    if bool((obs[exp == 0] > 0).any()):
        return 0.0                                               # a zero-probability outcome happened
    obs, exp = obs[exp > 0], exp[exp > 0]
    small = exp < 5                                              # pool rare cells
    if bool(small.any()):
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
    if obs.numel() < 2:
        return 1.0
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def shifted(pr, eps=0.01):
    """pr with eps moved from its largest to its second largest entry: the hardest 1% error to see."""
    top = pr.flatten().topk(2).indices
    out = pr.flatten().clone()
    out[top[0]] -= eps
    out[top[1]] += eps
    return out.reshape(pr.shape)


def joint_pvalues(em, P):
    """p-values of the first token and of the first two tokens against the target tables."""
    first = pvalue(em[:, 0], P[0])
    joint = pvalue(em[:, 0] * V + em[:, 1], P[0][:, None] * P[1])
    return first, joint


# ----------------------------------------------------------------------------- lossless: distributions

CASES = [  # method, draft scheme, tree shape, q given to the verifier
    ("sampling", "iid", "chain", True),
    ("sampling", "iid", "binary", True),
    ("rrs", "iid", "wide", True),
    ("rrs-wo", "wo", "binary", True),
    ("rrs-wo", "wo", "wide", True),
    ("sampling", "wo", "chain", True),
    ("spechub", "spechub", "binary", True),
    ("sampling", "spechub", "binary", True),
    ("target", "wo", "binary", False),
    ("sampling", "iid", "wide", False),                          # no q -> target sampler
]


@pytest.mark.parametrize("method,scheme,shape,use_q", CASES)
def test_lossless_random(method, scheme, shape, use_q):
    gen = torch.Generator().manual_seed(1)
    parents = SHAPES[shape]
    P, Q = tables("random", 1 + depth(parents), gen)
    B = 200_000
    em, n_acc = spec_run(P, Q, parents, method, scheme, B, seed=2, use_q=use_q)
    first, joint = joint_pvalues(em, P)
    assert first > ALPHA and joint > ALPHA, (first, joint)
    # the sample size resolves a 1% absolute error in any probability (noncentrality >= 80)
    assert pvalue(em[:, 0], shifted(P[0])) < ALPHA
    assert pvalue(em[:, 0] * V + em[:, 1], shifted(P[0][:, None] * P[1])) < ALPHA
    # the second token was sometimes a draft, sometimes this step's bonus, sometimes next step's
    for k in (0, 1, 2):
        frac = float((n_acc == k).float().mean() if k < 2 else (n_acc >= 2).float().mean())
        assert frac > 0.01, (k, frac)


KINDS = ["q_zeros", "p_eq_q", "p_onehot", "q_onehot", "topk"]
DEG_METHODS = [("rrs", "iid", "wide"), ("rrs-wo", "wo", "wide"), ("spechub", "spechub", "binary"),
               ("target", "iid", "binary")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,scheme,shape", DEG_METHODS)
def test_lossless_degenerate(kind, method, scheme, shape):
    gen = torch.Generator().manual_seed(3)
    parents = SHAPES[shape]
    P, Q = tables(kind, 1 + depth(parents), gen)
    em, _ = spec_run(P, Q, parents, method, scheme, 100_000, seed=4, use_q=method != "target")
    assert bool(((em >= 0) & (em < V)).all())
    first, joint = joint_pvalues(em, P)
    assert first > ALPHA and joint > ALPHA, (kind, first, joint)


def test_residual_never_nan():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    r = vmod._residual(p, p.clone(), p)                          # p == q: residual is all zeros
    assert torch.equal(r, p)
    nan = torch.full_like(p, float("nan"))
    assert torch.equal(vmod._residual(p, nan, p), p)
    assert torch.equal(vmod._renorm(torch.zeros(2, 3)), torch.zeros(2, 3))
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    r = vmod._residual(p, q, p)
    assert torch.allclose(r, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.375, 0.625]]))


# ----------------------------------------------------------------------------- the tests have power

def test_power_forgotten_residual(monkeypatch):
    """Resampling from p instead of the residual after a rejection is a classic lossy bug."""
    monkeypatch.setattr(vmod, "_residual", lambda p, q, fallback: fallback)
    gen = torch.Generator().manual_seed(1)
    P, Q = tables("random", 4, gen)
    em, _ = spec_run(P, Q, SHAPES["binary"], "rrs", "iid", 200_000, seed=2)
    first, joint = joint_pvalues(em, P)
    assert first < ALPHA and joint < ALPHA


def test_power_accept_always(monkeypatch):
    """A verifier that always accepts the first draft emits the draft's distribution."""
    def accept_first(p, xs, props, generator):
        j = torch.where(xs[:, 0] >= 0, 0, -1)
        return j, torch.where(j >= 0, xs[:, 0], p.argmax(-1))
    monkeypatch.setattr(vmod, "_try_in_order", accept_first)
    gen = torch.Generator().manual_seed(1)
    P, Q = tables("random", 4, gen)
    em, _ = spec_run(P, Q, SHAPES["binary"], "rrs", "iid", 200_000, seed=2)
    first, joint = joint_pvalues(em, P)
    assert first < ALPHA and joint < ALPHA


def test_power_wrong_rule_for_scheme():
    """The i.i.d. RRS rule applied to SpecHub drafts (which always contain the hub) is lossy."""
    gen = torch.Generator().manual_seed(5)
    P, Q = tables("random", 4, gen)
    em, _ = spec_run(P, Q, SHAPES["binary"], "rrs", "spechub", 200_000, seed=6, verify_scheme="iid")
    first, joint = joint_pvalues(em, P)
    assert first < ALPHA and joint < ALPHA


# ----------------------------------------------------------------------------- greedy

def onehot_rows(ids, v=8):
    return torch.nn.functional.one_hot(torch.tensor(ids), v).float()


def test_greedy_tree_accepts_argmax_path():
    #        0
    #     /  |  \
    #    1   2   3        argmax after 0 is 5: node 2 (token 5) and node 3 (token 5, later duplicate)
    #   /   / \
    #  4   5   6          argmax after 2 is 1: node 6; after 6 it is 7 (bonus)
    parents = torch.tensor([-1, 0, 0, 0, 1, 2, 2])
    tokens = torch.tensor([9 % 8, 4, 5, 5, 2, 0, 1])
    p = onehot_rows([5, 2, 1, 3, 0, 0, 7])
    path, tok = verify(Draft(tokens, parents), p, "greedy")
    assert (path, tok) == ([2, 6], 7)
    # same answer from the batched walk
    last, nxt, n_acc = verify_batch(tokens[None], parents, p[None], None, "greedy")
    assert (int(last), int(nxt), int(n_acc)) == (6, 7, 2)
    # root without children -> bonus token
    assert verify(Draft(tokens[:1], parents[:1]), p[:1], "greedy") == ([], 5)
    # first child mismatching -> stop at the root
    p2 = onehot_rows([3, 2, 1, 3, 0, 0, 7])
    assert verify(Draft(tokens, parents), p2, "greedy") == ([], 3)


def test_greedy_chain_vectorised():
    tokens = torch.tensor([0, 3, 1, 4, 6])
    parents = torch.tensor([-1, 0, 1, 2, 3])
    d = Draft(tokens, parents)
    assert verify(d, onehot_rows([3, 1, 5, 6, 2]), "greedy") == ([1, 2], 5)
    assert verify(d, onehot_rows([3, 1, 4, 6, 2]), "greedy") == ([1, 2, 3, 4], 2)
    assert verify(d, onehot_rows([2, 1, 4, 6, 2]), "greedy") == ([], 2)
    # greedy ignores q and the scheme, and works on non-one-hot p (argmax)
    p = torch.rand(5, 8)
    p[torch.arange(4), tokens[1:]] = 2.0
    d = Draft(tokens, parents, q=torch.rand(5, 8).softmax(-1), scheme="wo")
    assert verify(d, p, "greedy") == ([1, 2, 3, 4], int(p[4].argmax()))


def test_greedy_spec_equals_plain_greedy():
    gen = torch.Generator().manual_seed(7)
    parents = SHAPES["binary"]
    P, Q = tables("greedy", 1 + depth(parents), gen)
    em, n_acc = spec_run(P, Q, parents, "greedy", "wo", 20_000, seed=8)
    x0 = int(P[0].argmax())
    assert bool((em[:, 0] == x0).all()) and bool((em[:, 1] == int(P[1][x0].argmax())).all())
    assert float((n_acc >= 1).float().mean()) > 0.1            # drafts did get accepted


# ----------------------------------------------------------------------------- acceptance rates

def first_step_acceptance(method, scheme, M=200, T=2000, v=8, seed=11):
    """Mean accepted drafts at the root for 2 drafts, over M random (p, q) pairs with T trials each."""
    gen = torch.Generator().manual_seed(seed)
    zp = torch.randn(M, v, generator=gen) * 2
    p = zp.softmax(-1)
    q = (zp + torch.randn(M, v, generator=gen) * 1.5).softmax(-1)
    pb, qb = p.repeat_interleave(T, 0), q.repeat_interleave(T, 0)          # [M*T, v]
    tok = torch.zeros(M * T, 3, dtype=torch.long)
    tok[:, 1:] = sample_children(qb, 2, scheme, gen)
    P3 = torch.stack([pb, pb, pb], 1)
    Q3 = torch.stack([qb, qb, qb], 1)
    _, _, n_acc = verify_batch(tok, [-1, 0, 0], P3, Q3, method, scheme, gen)
    return n_acc.float().mean().item(), p, q


def test_acceptance_spechub_and_wo_beat_rrs():
    rrs, p, q = first_step_acceptance("rrs", "iid")
    wo, _, _ = first_step_acceptance("rrs-wo", "wo")
    hub, _, _ = first_step_acceptance("spechub", "spechub")
    se = 0.5 / (200 * 2000) ** 0.5                               # std error bound of each mean
    assert wo > rrs + 3 * se, (rrs, wo)
    assert hub > rrs + 3 * se, (rrs, hub)
    # SpecHub reaches the optimum for its drafts: p(a) + sum_{x != a} min(p(x), r(x))
    a = q.argmax(-1, keepdim=True)
    r = q.scatter(1, a, 0.0)
    r = r / r.sum(-1, keepdim=True)
    best = (p.gather(1, a)[:, 0] + torch.minimum(p, r).scatter(1, a, 0.0).sum(-1)).mean().item()
    assert abs(hub - best) < 4 * se, (hub, best)


# ----------------------------------------------------------------------------- draft-side sampling

def test_sample_children_distributions():
    gen = torch.Generator().manual_seed(12)
    q = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])
    B = 100_000
    qb = q.expand(B, V)
    iid = sample_children(qb, 2, "iid", gen)
    assert pvalue(iid[:, 0] * V + iid[:, 1], q[:, None] * q) > ALPHA
    wo = sample_children(qb, 2, "wo", gen)
    pair = q[:, None] * q / (1 - q[:, None])
    pair.fill_diagonal_(0)
    assert pvalue(wo[:, 0] * V + wo[:, 1], pair) > ALPHA
    hub = sample_children(qb, 2, "spechub", gen)
    a = 1
    pair = torch.zeros(V, V)
    pair[:, a] = q                                               # first != a, second = hub
    pair[a] = q * q[a] / (1 - q[a])                              # first = a, second ~ q without a
    pair[a, a] = 0
    assert pvalue(hub[:, 0] * V + hub[:, 1], pair) > ALPHA


def test_sample_children_small_support():
    gen = torch.Generator().manual_seed(13)
    q = torch.tensor([0.0, 0.7, 0.0, 0.3])
    out = sample_children(q, 3, "wo", gen)
    assert sorted(out.tolist()) == [1, 3]
    assert sample_children(torch.tensor([0.0, 1.0, 0.0]), 2, "spechub", gen).tolist() == [1]
    b = sample_children(q.expand(4, 4), 3, "wo", gen)
    assert b.shape == (4, 3) and bool((b[:, 2] == -1).all())
    assert sample_children(q, 0, "iid", gen).numel() == 0


# ----------------------------------------------------------------------------- scalar verify()

def test_verify_matches_batch_and_returns_valid_paths():
    gen = torch.Generator().manual_seed(14)
    parents = SHAPES["binary"]
    P, Q = tables("random", 4, gen)
    for method, scheme in [("rrs", "iid"), ("rrs-wo", "wo"), ("spechub", "spechub"), ("target", "iid")]:
        em = torch.full((1, 1), -1, dtype=torch.long)
        for seed in range(30):
            tok, p, q = build(P, Q, parents, scheme, em, torch.zeros(1, dtype=torch.long), gen)
            d = Draft(tok[0], torch.tensor(parents), q[0] if method != "target" else None, scheme)
            path, nxt = verify(d, p[0], method, torch.Generator().manual_seed(seed))
            last, bn, na = verify_batch(tok, parents, p, d.q[None] if d.q is not None else None,
                                        method, scheme, torch.Generator().manual_seed(seed))
            assert len(path) == int(na) and nxt == int(bn) and (path[-1] if path else 0) == int(last)
            for a, b in zip([0] + path, path):
                assert parents[b] == a


def test_verify_errors():
    tokens, parents = torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 0])
    q = torch.full((3, 4), 0.25)
    p = torch.full((3, 4), 0.25)
    with pytest.raises(SpecqError):
        verify(Draft(tokens, parents, q, "iid"), p, "bogus")
    with pytest.raises(SpecqError):                              # rrs rule on w/o-replacement siblings
        verify(Draft(tokens, parents, q, "wo"), p, "rrs")
    with pytest.raises(SpecqError):                              # needs q
        verify(Draft(tokens, parents, None, "iid"), p, "rrs")
    with pytest.raises(SpecqError):
        verify(Draft(tokens, parents, q, "iid"), p[:2], "rrs")
    qh = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(3, 4)       # hub = 3, not among the children
    with pytest.raises(SpecqError):
        verify(Draft(tokens, parents, qh, "spechub"), p, "spechub")
    with pytest.raises(SpecqError):
        verify(Draft(torch.tensor([0, 3, 1, 2]), torch.tensor([-1, 0, 0, 0]), qh[[0, 0, 0, 0]],
                     "spechub"), p[[0, 0, 0, 0]], "spechub")
    # a chain may use any sampling rule
    chain = Draft(torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 1]), q, "wo")
    path, tok = verify(chain, p, "rrs")
    assert 0 <= tok < 4
