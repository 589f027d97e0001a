"""Lossless verification of draft trees, and the draft-side sampling that each rule assumes.

Every verifier is a pure function of the target probabilities p (one row per draft node: the
target's distribution of the token that follows that node, after specq.sampling.probs) and, for
the sampling rules, the draft probabilities q the node's children were drawn from. Walking from
the root, each node either moves to one of its children or stops and emits a token; the emitted
sequence is distributed exactly as the target's (greedy: equals the target's argmax sequence).

Rules (background.md sections 1, 2, 4):
  greedy    move to the child whose token is argmax p; else emit argmax p.
  rrs       children drawn i.i.d. from q. Try them in order: accept x if u < p(x)/q(x); on
            rejection p <- norm(max(p - q, 0)). Emit a draw from p when all are rejected.
            For a chain this is standard speculative sampling.
  rrs-wo    children drawn from q without replacement. As rrs, but after each rejection q is
            renormalised with the rejected token removed.
  spechub   two children: hub a = argmax q and one other token x. With the draft sampling of
            sample_children(.., "spechub"), x is distributed as r = q without a, renormalised:
            P(x) = q(x) + q(a) q(x) / (1 - q(a)) = q(x) / (1 - q(a)). So the pair is verified as
            two speculative steps: x against proposal r, then a against the point mass at a
            (accept with prob p1(a) where p1 = norm(max(p - r, 0)); on rejection emit from p1
            without a). Each step is an ordinary lossless speculative step, so the whole is
            lossless, and its acceptance p(a) + sum_{x != a} min(p(x), r(x)) is the largest any
            rule can reach with these drafts (the hub is always drafted, x only when drawn).
            A node with one child (q one-hot, or a proposer that kept only the first draw) is
            plain speculative sampling.
  sampling  the lossless rule that matches the draft: "iid" -> rrs, "wo" -> rrs-wo,
            "spechub" -> spechub, no q -> target.
  target    for drafts without q (n-gram, top-k trees): draw x ~ p; move to the child with token
            x if there is one, else emit x. Lossless whatever the drafts are.

Residual distributions that vanish or are not finite fall back to p, so nothing emits NaN.

verify() handles one draft; verify_batch() runs B independent drafts of one tree shape at once
(same code path; the tests use it to check the output distributions on ~1e5 trials in seconds).
"""
from __future__ import annotations

import torch

from ..errors import SpecqError
from .base import Draft

METHODS = ("greedy", "sampling", "rrs", "rrs-wo", "spechub", "target")
SCHEMES = ("iid", "wo", "spechub")
_RULE_SCHEME = {"rrs": "iid", "rrs-wo": "wo", "spechub": "spechub"}
_SCHEME_RULE = {v: k for k, v in _RULE_SCHEME.items()}


# ----------------------------------------------------------------------------- small helpers

def _sample(w: torch.Tensor, generator=None) -> torch.Tensor:
    """w [..., V] non-negative weights (rows with positive sum) -> [...] indices drawn prop. to w.
    Exponential race: argmax w / E with E ~ Exp(1); a zero weight is never chosen."""
    e = torch.empty_like(w).exponential_(generator=generator).clamp_min(1e-30)
    return (w / e).argmax(-1)


def _renorm(w: torch.Tensor) -> torch.Tensor:
    """w [B, V] -> w / sum, zeros where the sum vanishes or is not finite."""
    s = w.sum(-1, keepdim=True)                                             # [B, 1]
    ok = (s > 0) & torch.isfinite(s)
    return torch.where(ok, w / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(w))


def _residual(p: torch.Tensor, q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)) [B, V]; rows where it vanishes or is not finite take `fallback`."""
    r = (p - q).clamp_min(0)                                                # [B, V]
    s = r.sum(-1, keepdim=True)                                             # [B, 1]
    ok = (s > 0) & torch.isfinite(s)
    return torch.where(ok, r / torch.where(ok, s, torch.ones_like(s)), fallback)


def _first_match(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """xs [B, K] child tokens (-1 = none), t [B] -> [B] index of the first child with token t, or -1."""
    m = xs == t[:, None]                                                    # [B, K]
    return torch.where(m.any(1), m.int().argmax(1), -1)


# ----------------------------------------------------------------------------- per-node rules

def _try_in_order(p, xs, props, generator):
    """Sequential speculative sampling at one node.

    p [B, V] target; xs [B, K] candidate tokens tried in column order (-1 = none, only at the end);
    props: K tensors [B, V], props[j] = the distribution candidate j was drawn from given that
    candidates < j were drawn and rejected. Returns (j [B] accepted column or -1, y [B] token:
    the accepted candidate, or a draw from the final residual)."""
    B = p.shape[0]
    res = p                                                                 # [B, V] current target
    j_acc = torch.full((B,), -1, dtype=torch.long, device=p.device)
    for j in range(xs.shape[1]):
        x = xs[:, j]                                                        # [B]
        live = (x >= 0) & (j_acc < 0)
        xi = x.clamp_min(0)[:, None]                                        # [B, 1]
        px = res.gather(1, xi)[:, 0]                                        # [B]
        qx = props[j].gather(1, xi)[:, 0]                                   # [B]
        u = torch.rand(B, generator=generator, device=p.device)
        acc = live & (u * qx < px)          # u < p/q without dividing; q(x)=0 < p(x) accepts
        j_acc = torch.where(acc, j, j_acc)
        rej = (live & ~acc)[:, None]
        res = torch.where(rej, _residual(res, props[j], p), res)
    picked = xs.gather(1, j_acc.clamp_min(0)[:, None])[:, 0]
    y = torch.where(j_acc >= 0, picked, _sample(res, generator))
    return j_acc, y


def _spechub_step(p, q, xs, generator):
    """SpecHub at one node. xs [B, K<=2] children tokens; see the module docstring for the rule."""
    B, V = p.shape
    if xs.shape[1] > 2:
        raise SpecqError("spechub verifies at most 2 drafts per node")
    if xs.shape[1] < 2:
        xs = torch.cat([xs, xs.new_full((B, 2 - xs.shape[1]), -1)], 1)    # [B, 2]
    a = q.argmax(-1)                                                        # [B] hub
    two = xs[:, 1] >= 0                                                     # [B] rows with 2 drafts
    hub_first = xs[:, 0] == a
    if bool((two & ~(hub_first ^ (xs[:, 1] == a))).any()):
        raise SpecqError("spechub draft: a node's two children must be the hub argmax q and one other token")
    other = torch.where(hub_first, xs[:, 1], xs[:, 0])                      # [B] non-hub draft
    r = _renorm(q.scatter(1, a[:, None], 0.0))                              # [B, V] q without a
    hub = torch.nn.functional.one_hot(a, V).to(q.dtype)                     # [B, V] point mass at a
    cand = torch.stack([torch.where(two, other, xs[:, 0]),
                        torch.where(two, a, -1)], 1)                        # [B, 2] tried in this order
    props = [torch.where(two[:, None], r, q), hub]
    j, y = _try_in_order(p, cand, props, generator)
    h = hub_first.long()                                                    # child index of `other`
    k = torch.where(two & (j >= 0), torch.where(j == 0, h, 1 - h), j)       # back to child order
    return k, y


def _node_step(method, p, q, xs, generator):
    """One node for B drafts. p, q [B, V]; xs [B, K] children tokens (-1 = none).
    Returns (k [B] index of the child moved to, or -1; y [B] emitted token when k == -1)."""
    if method == "greedy":
        t = p.argmax(-1)                                                    # [B]
        return _first_match(xs, t), t
    if method == "target":
        x = _sample(p, generator)                                           # [B]
        return _first_match(xs, x), x
    if method == "rrs":
        return _try_in_order(p, xs, [q] * xs.shape[1], generator)
    if method == "rrs-wo":
        props = [q]
        for j in range(xs.shape[1] - 1):                # q_{j+1} = q_j without x_j, renormalised
            x = xs[:, j:j + 1]                                              # [B, 1]
            drop = props[-1].scatter(1, x.clamp_min(0), 0.0)
            props.append(torch.where(x >= 0, _renorm(drop), props[-1]))
        return _try_in_order(p, xs, props, generator)
    if method == "spechub":
        return _spechub_step(p, q, xs, generator)
    raise AssertionError(method)


# ----------------------------------------------------------------------------- tree walks

def resolve_method(method: str, scheme: str, has_q: bool, multi: bool = True) -> str:
    """Map (method, draft scheme) to the per-node rule, checking that the rule is lossless for it.
    multi = whether some node has two or more children (chains work with any sampling rule)."""
    if method not in METHODS:
        raise SpecqError(f"unknown verification method {method!r}; choose from {', '.join(METHODS)}")
    if scheme not in SCHEMES:
        raise SpecqError(f"unknown draft scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if method == "sampling":
        return _SCHEME_RULE[scheme] if has_q else "target"
    if method in _RULE_SCHEME:
        if not has_q:
            raise SpecqError(f"method {method!r} needs draft probabilities q; use 'target' for drafts without them")
        if multi and scheme != _RULE_SCHEME[method]:
            raise SpecqError(f"method {method!r} is lossless only for drafts sampled with scheme "
                             f"{_RULE_SCHEME[method]!r}, got {scheme!r}")
    return method


def _children_table(parents: list[int], device) -> torch.Tensor:
    """parents [N] -> [N, K] children indices per node, -1 padded (K >= 1)."""
    kids: list[list[int]] = [[] for _ in parents]
    for i, par in enumerate(parents):
        if par >= 0:
            kids[par].append(i)
    K = max(1, max(len(c) for c in kids))
    return torch.tensor([c + [-1] * (K - len(c)) for c in kids], dtype=torch.long, device=device)


def verify_batch(tokens: torch.Tensor, parents, p: torch.Tensor, q: torch.Tensor | None,
                 method: str, scheme: str = "iid", generator=None):
    """Verify B drafts that share one tree shape.

    tokens [B, N] long (tokens[:, 0] = root; -1 marks a node absent in that draft, and then its
    descendants must be absent too); parents [N] (list or tensor, parents[0] = -1, parents[i] < i);
    p [B, N, V] target probabilities; q [B, N, V] draft probabilities or None.
    Returns (last [B] the deepest accepted node (0 = none), token [B] the next emitted token,
    n_acc [B] the number of accepted drafts)."""
    par = [int(x) for x in (parents.tolist() if torch.is_tensor(parents) else parents)]
    B, N = tokens.shape
    if p.shape[:2] != (B, N) or (q is not None and q.shape != p.shape):
        raise SpecqError(f"verify: shapes do not match: tokens {tuple(tokens.shape)}, p {tuple(p.shape)}, "
                         f"q {None if q is None else tuple(q.shape)}")
    if len(par) != N or par[0] != -1 or any(not (0 <= par[i] < i) for i in range(1, N)):
        raise SpecqError("verify: parents must have parents[0] = -1 and 0 <= parents[i] < i")
    kids = _children_table(par, tokens.device)                              # [N, K]
    multi = kids.shape[1] > 1
    rule = resolve_method(method, scheme, q is not None, multi)
    p = p.float()
    q = q.float() if q is not None and rule not in ("greedy", "target") else None
    depth = [0] * N
    for i in range(1, N):
        depth[i] = depth[par[i]] + 1
    rows = torch.arange(B, device=tokens.device)
    cur = torch.zeros(B, dtype=torch.long, device=tokens.device)            # [B] current node
    out = torch.zeros(B, dtype=torch.long, device=tokens.device)            # [B] emitted token
    n_acc = torch.zeros(B, dtype=torch.long, device=tokens.device)
    active = torch.ones(B, dtype=torch.bool, device=tokens.device)
    for _ in range(max(depth) + 1):
        ch = kids[cur]                                                      # [B, K] child nodes
        xs = torch.where(ch >= 0, tokens.gather(1, ch.clamp_min(0)), -1)    # [B, K] child tokens
        xs = torch.where(active[:, None], xs, -1)
        pn = p[rows, cur]                                                   # [B, V]
        qn = q[rows, cur] if q is not None else None
        k, y = _node_step(rule, pn, qn, xs, generator)
        moved = k >= 0                                                      # only active rows can move
        out = torch.where(active & ~moved, y, out)
        cur = torch.where(moved, ch.gather(1, k.clamp_min(0)[:, None])[:, 0], cur)
        n_acc = n_acc + moved.long()
        active = moved
        if not bool(active.any()):
            break
    return cur, out, n_acc


def _verify_greedy(draft: Draft, p: torch.Tensor) -> tuple[list[int], int]:
    t = p.argmax(-1)                                                        # [N] target's choice
    n = len(draft)
    par = draft.parents.tolist()
    if par == list(range(-1, n - 1)):                                       # chain: one compare
        match = draft.tokens[1:].to(t.device) == t[:-1]                     # [N-1]
        a = match.long().cumprod(0).sum()                                   # accepted drafts
        a, tok = torch.stack([a, t.gather(0, a.view(1))[0]]).tolist()
        return list(range(1, a + 1)), tok
    tl, tok, kids = t.tolist(), draft.tokens.tolist(), draft.children()
    path, i = [], 0
    while True:
        nxt = next((c for c in kids[i] if tok[c] == tl[i]), None)
        if nxt is None:
            return path, tl[i]
        path.append(nxt)
        i = nxt


def verify(draft: Draft, p: torch.Tensor, method: str, generator=None) -> tuple[list[int], int]:
    """draft (N nodes), p [N, V] target probabilities -> (path: accepted node indices in order,
    root excluded; token: the next emitted token, recovered or bonus)."""
    n = len(draft)
    if p.dim() != 2 or p.shape[0] != n:
        raise SpecqError(f"verify: p must be [N={n}, V], got {tuple(p.shape)}")
    if draft.q is not None and draft.q.shape != p.shape:
        raise SpecqError(f"verify: draft q {tuple(draft.q.shape)} does not match p {tuple(p.shape)}")
    par = draft.parents.tolist()
    multi = len(set(par[1:])) < n - 1                                       # some node has 2+ children
    rule = resolve_method(method, draft.scheme, draft.q is not None, multi)
    if rule == "greedy":
        return _verify_greedy(draft, p)
    dev = p.device
    q = draft.q[None].to(dev) if draft.q is not None else None
    last, tok, _ = verify_batch(draft.tokens[None].to(dev), draft.parents, p[None], q,
                                method, draft.scheme, generator)
    last, tok = torch.stack([last[0], tok[0]]).tolist()
    path = []
    while last > 0:
        path.append(last)
        last = par[last]
    return path[::-1], tok


# ----------------------------------------------------------------------------- draft-side sampling

def sample_children(q: torch.Tensor, n: int, scheme: str = "iid", generator=None) -> torch.Tensor:
    """Draw n sibling drafts from q the way the matching verifier assumes.

    q [V] -> LongTensor [m], m <= n (fewer only when q's support is too small for "wo"/"spechub");
    q [B, V] -> LongTensor [B, n], padded with -1 at the end of such rows.
      iid      n independent draws from q
      wo       n draws without replacement (Gumbel top-k, done as an exponential race)
      spechub  n <= 2: first ~ q; second = hub a = argmax q if first != a, else a draw from q
               without a (none if q is one-hot)"""
    if scheme not in SCHEMES:
        raise SpecqError(f"unknown draft scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if n < 0:
        raise SpecqError(f"number of drafts must be >= 0, got {n}")
    single = q.dim() == 1
    q2 = q.float().reshape(-1, q.shape[-1])                                 # [B, V]
    B, V = q2.shape
    if n == 0:
        out = torch.empty(B, 0, dtype=torch.long, device=q.device)
    elif scheme == "iid":
        out = _sample(q2[:, None, :].expand(B, n, V), generator)            # [B, n]
    elif scheme == "wo":
        e = torch.empty_like(q2).exponential_(generator=generator).clamp_min(1e-30)
        m = min(n, V)
        idx = (q2 / e).topk(m, dim=-1).indices                              # [B, m] race order
        out = torch.where(q2.gather(1, idx) > 0, idx, -1)
        if m < n:
            out = torch.cat([out, out.new_full((B, n - m), -1)], 1)
    else:
        if n > 2:
            raise SpecqError("spechub draws at most 2 drafts per node")
        first = _sample(q2, generator)                                      # [B]
        if n == 1:
            out = first[:, None]
        else:
            a = q2.argmax(-1)                                               # [B] hub
            rest = q2.scatter(1, a[:, None], 0.0)                           # [B, V] q without a
            has_rest = rest.sum(-1) > 0
            second = torch.where(first != a, a,
                                 torch.where(has_rest, _sample(rest, generator), -1))
            out = torch.stack([first, second], 1)                           # [B, 2]
    if single:
        out = out[0]
        return out[out >= 0]
    return out
