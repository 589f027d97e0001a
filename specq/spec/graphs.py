"""Static-shape steps of the speculative loop, run eagerly (CPU) or as CUDA graphs (GPU).

Every step takes tensors only (cache positions and counts as long tensors [1]) and has output shapes
that depend only on a padded row count M, so the same code runs eagerly and inside a CUDA graph,
one graph per bucket M (BUCKETS) captured lazily and replayed on static input buffers.

Padding: a call with n real rows out of M gives rows n..M-1 the cache's scratch slot S-1 for their
K/V and a mask row that sees only S-1. Real rows never see S-1 (callers keep every real slot and
the tree block L..L+M-1 below S-1), so padded rows change nothing real rows read; their outputs
are ignored.

    tree_inputs(L, depth, anc, n, S)        -> pos, slots, mask    a tree at cache slots L..L+n-1
    walk(ids, parents, depth, anc, n, t)    -> res, idx            greedy / target-sample tree walk
    move_path(model, L, idx)                                       accepted path K/V -> slots L..
    TreeRunner(model).tree(...)                                    forward (+ walk + move), bucketed
    TreeRunner(model).forward(...)                                 any (ids, pos, slots, mask), bucketed
"""
from __future__ import annotations

import sys
import weakref

import torch

from ..sampling import SamplingParams, probs

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 128, 160, 192, 256)


def bucket(n: int) -> int:
    """Padded row count for n rows (n itself beyond the largest bucket)."""
    return next((b for b in BUCKETS if b >= n), n)


# ----------------------------------------------------------------------------- pure steps

def tree_inputs(L, depth, anc, n, S: int):
    """L, n long [1]; depth [M] long; anc [M, M] bool (entries outside [:n, :n] are ignored).
    -> pos [M], slots [M], mask [M, S] bool, anc [M, M] with the padding cleared.
    Real row i: slot L+i, position L+depth[i]; sees slots < L and the slots of its ancestors (and itself)."""
    M, dev = depth.shape[0], depth.device
    ar = torch.arange(M, device=dev)
    real = ar < n                                                           # [M]
    anc = anc & real[None, :] & real[:, None]
    slots = torch.where(real, L + ar, S - 1)
    pos = torch.where(real, L + depth, L)
    j = torch.arange(S, device=dev)
    rel = j - L                                                             # [S] slot -> node index
    blk = anc[:, rel.clamp(0, M - 1)] & ((rel >= 0) & (rel < M))[None, :]  # [M, S]
    mask = torch.where(real[:, None], (j < L)[None, :] | blk, (j == S - 1)[None, :])
    return pos, slots, mask, anc


def walk(ids, parents, depth, anc, n, t):
    """Tree walk with the target's token t [M] at every node (argmax at T=0; an independent sample from
    the target at T>0, which makes it the lossless "target" rule): from the root, move to the child whose
    token is t[node], else stop and emit t[node].

    ids, parents, depth [M] long; anc [M, M] bool, padding cleared (tree_inputs); n long [1].
    -> res [M+2] long = (a, next token, tokens of the path's nodes root first (a of them), filler...),
       idx [M] long: idx[d] = the path's node at depth d for d < a, else d (so moving idx -> d is a no-op).
    Siblings with equal tokens are allowed: the first deepest matching node wins."""
    M, dev = ids.shape[0], ids.device
    ar = torch.arange(M, device=dev)
    real = ar < n
    ok = ((ids == t[parents.clamp_min(0)]) | (ar == 0)) & real              # node matches its parent's t
    acc = ~(anc & ~ok[None, :]).any(1) & real                               # whole path from the root matches
    deep = torch.where(acc, depth, -1).argmax().view(1)                     # first deepest accepted node
    on = anc.index_select(0, deep)[0]                                       # [M] nodes on its path
    a = on.sum().view(1)
    idx = torch.cat([ar, ar[:1]]).scatter(0, torch.where(on, depth, M), ar)[:M]
    res = torch.cat([a, t.index_select(0, deep), ids[idx]])
    return res, idx


def move_path(model, L, idx):
    """Copy K/V of slots L+idx onto L+0..L+M-1 in every layer (gather first, so overlaps are safe)."""
    ar = torch.arange(idx.shape[0], device=idx.device)
    src, dst = L + idx, L + ar
    for layer in model.layers:
        layer.self_attn.cache.move(src, dst)


def sample_rows(logits, sp: SamplingParams, noise):
    """t [M]: argmax when greedy, else one draw per row from probs(logits) with noise [M, V] ~ Exp(1)
    (exponential race: argmax p / E)."""
    if sp.greedy:
        return logits.argmax(-1)
    return (probs(logits, sp) / noise.clamp_min(1e-30)).argmax(-1)


# ----------------------------------------------------------------------------- CUDA graphs

def capture(fn, warmup: int = 2):
    """CUDA graph of fn() (which reads and writes only static tensors); returns (graph, fn's output).
    fn runs `warmup` times first on a side stream: it must be harmless on the current buffers."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


class GraphCache:
    """Graphs of one owner (model or head), dropped when the tensors they captured move (cache resized)."""

    def __init__(self):
        self.ident = None
        self.graphs: dict = {}
        self.failed = False

    def check(self, ident) -> None:
        if ident != self.ident:
            self.graphs.clear()
            self.ident = ident

    def get(self, key, build):
        """build() -> (graph, buffers, outputs); None when capture is not possible here (fallback: eager)."""
        if self.failed:
            return None
        if key not in self.graphs:
            try:
                self.graphs[key] = build()
            except Exception as e:  # an op that cannot be captured: run eagerly from now on
                print(f"specq: CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly",
                      file=sys.stderr)
                self.failed = True
                return None
        return self.graphs[key]


def cache_ident(model) -> tuple:
    c = model.layers[0].self_attn.cache
    return (model.cache_size, c.k.data_ptr(), c.v.data_ptr())


class TreeRunner:
    """Bucketed forwards of one Transformer over its static cache; CUDA graphs on GPU.

    tree():    a draft tree at slots L..L+n-1 (mask built from depth / ancestors); with rule "greedy" or
               "target" also the tree walk and the accepted path's K/V move, all in one graph.
    forward(): any (ids, pos, slots, mask) block (draft-model levels)."""

    def __init__(self, model, graphs: bool | None = None, pad: bool | None = None, compile: bool = False):
        self.model = model
        cuda = model.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs
        self.pad = self.graphs if pad is None else pad
        self.cache = GraphCache()
        # compile: both step functions torch.compile'd once each with a symbolic row count (quantized Linears and
        # attention as opaque ops), then captured per bucket like the eager ones
        self.compile = compile
        self.tree_fn, self.fwd_fn = self._tree_fn, self._fwd_fn
        if compile:    # (under llama.COMPILE_BLOCKS: the model's layers compiled, the steps around them eager)
            from ..models.llama import compile_step
            self.tree_fn = compile_step(model, self._tree_fn, dynamic=True)
            self.fwd_fn = compile_step(model, self._fwd_fn, dynamic=True)

    # -- static buffers of one bucket
    def _bufs(self, M: int, V: int | None = None, fwd: bool = False):
        dev, S = self.model.device, self.model.cache_size
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
        b = {"ids": z(M), "L": z(1), "n": z(1)}
        if fwd:     # forward(): explicit positions, slots, mask
            b.update(pos=z(M), slots=torch.full((M,), S - 1, dtype=torch.long, device=dev), mask=z(M, S, dt=torch.bool))
        else:       # tree(): the tree's shape
            b.update(parents=z(M), depth=z(M), anc=z(M, M, dt=torch.bool))
        if V is not None:
            b["noise"] = torch.ones(M, V, dtype=torch.float32, device=dev)
        return b

    def _tree_fn(self, b, rule, sp):
        m = self.model
        pos, slots, mask, anc = tree_inputs(b["L"], b["depth"], b["anc"], b["n"], m.cache_size)
        logits, hidden = m(b["ids"], pos, slots, mask)
        if rule is None:
            return logits, hidden, None, None
        t = sample_rows(logits, sp, b.get("noise"))
        res, idx = walk(b["ids"], b["parents"], b["depth"], anc, b["n"], t)
        move_path(m, b["L"], idx)
        return logits, hidden, res, idx

    def _fwd_fn(self, b):
        m, S = self.model, self.model.cache_size
        M = b["ids"].shape[0]
        real = torch.arange(M, device=m.device) < b["n"]
        slots = torch.where(real, b["slots"], S - 1)
        j = torch.arange(S, device=m.device)
        mask = torch.where(real[:, None], b["mask"], (j == S - 1)[None, :])
        return m(b["ids"], b["pos"], slots, mask)

    def _fill(self, b, n: int, L: int, **src):
        """Copy the first n rows of each source into the buffers (the rest is padding, ignored)."""
        for k, v in src.items():
            if k == "anc":
                b[k][:n, :n].copy_(v)
            else:
                b[k][:n].copy_(v)
        b["L"].fill_(L)
        b["n"].fill_(n)

    def _graph(self, key, M, make_fn, V=None, fwd=False):
        def build():
            b = self._bufs(M, V, fwd)
            g, out = capture(lambda: make_fn(b))   # n = 0: the warm-up writes only the scratch slot
            return g, b, out
        return self.cache.get(key, build)

    def fits(self, L: int, n: int) -> int:
        """Rows to run: the bucket when padding fits below the scratch slot, else n (exact, eager)."""
        M = bucket(n) if self.pad else n
        return M if L + M <= self.model.cache_size - 1 else n

    def tree(self, tokens, parents, depth, anc, L: int, rule: str | None = None, sp=SamplingParams(), gen=None):
        """tokens, parents, depth [n] long; anc [n, n] bool; rule None (forward only), "greedy" or "target".
        -> (logits [M, V], hidden [M, D], res, idx, ids [M]) - rows >= n are padding; res / idx as in walk()
        (None without a rule). Outputs live in static buffers: use them before the next call."""
        n = tokens.shape[0]
        M = self.fits(L, n)
        use_graph = self.graphs and M in BUCKETS
        if use_graph:
            self.cache.check(cache_ident(self.model))
            V = self.model.cfg.vocab_size if rule == "target" else None
            key = ("tree", M, rule, sp if rule == "target" else None)
            entry = self._graph(key, M, lambda b: self.tree_fn(b, rule, sp), V)
            if entry is not None:
                g, b, out = entry
                self._fill(b, n, L, ids=tokens, parents=parents, depth=depth, anc=anc)
                if rule == "target":
                    b["noise"].exponential_(generator=gen)
                g.replay()
                return (*out, b["ids"])
        b = self._bufs(M, self.model.cfg.vocab_size if rule == "target" else None)
        self._fill(b, n, L, ids=tokens, parents=parents, depth=depth, anc=anc)
        if rule == "target":
            b["noise"].exponential_(generator=gen)
        return (*self.tree_fn(b, rule, sp), b["ids"])

    def forward(self, ids, pos, slots, mask, max_slot: int):
        """ids, pos, slots [n]; mask [n, S] bool; max_slot = the largest of slots (host int; padding needs
        it below the scratch slot S-1) -> logits [n, V], hidden [n, D] (views of static buffers on GPU)."""
        n = ids.shape[0]
        M = bucket(n) if self.pad and max_slot < self.model.cache_size - 1 else n
        if self.graphs and M in BUCKETS:
            self.cache.check(cache_ident(self.model))
            entry = self._graph(("fwd", M), M, self.fwd_fn, fwd=True)
            if entry is not None:
                g, b, out = entry
                self._fill(b, n, 0, ids=ids, pos=pos, slots=slots, mask=mask)
                g.replay()
                return out[0][:n], out[1][:n]
        b = self._bufs(M, fwd=True)
        self._fill(b, n, 0, ids=ids, pos=pos, slots=slots, mask=mask)
        logits, hidden = self.fwd_fn(b)
        return logits[:n], hidden[:n]


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def runner_for(model, compile: bool | None = None) -> TreeRunner:
    """The model's TreeRunner (graphs live as long as the model and its cache); compile True / False asks for
    a compiled / eager one (None: whichever exists, else eager)."""
    r = _RUNNERS.get(model)
    if r is None or r.graphs != (model.device.type == "cuda") or (compile is not None and r.compile != compile):
        r = _RUNNERS[model] = TreeRunner(model, compile=bool(compile))
    return r
