"""GPU work units of the controlled end-to-end benchmark: each is the real forward of the right model shape,
captured as a CUDA graph per fixed shape (key) and replayed, so Python overhead does not dominate.

    Graphs      key -> captured graph (CUDA) or a plain call (CPU); time() = median seconds of a call
    Verifier    a model's forward over M draft nodes at cache slots L.. with the draft's tree mask
                -> (argmax [M], hidden [M, D])          (target verification, intermediate verification)
    Keeper      moves an accepted tree path's K/V into place in every layer (padded to a fixed length)
    ChainDrafter   k greedy 1-token forwards of a draft model, each output fed to the next (one graph)
    EagleDrafter   EAGLE-2 head: commit of the accepted tokens (+ root distribution), then the dynamic
                tree: `depth` head forwards over top_k beams + lm_head + top-k, final top-(N-1) selection
Static inputs (the position L, token buffers) live in tensors the graphs read; set them before a call.
"""
from __future__ import annotations

import time

import torch

from ..spec.tree import ancestor_mask, positions
from ..models import llama


class Graphs:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None

    def __call__(self, key, fn):
        if not self.cuda:
            return fn()
        if key not in self.graphs:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):        # warm-up: kernel compilation, one-time weight repacks
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = fn()
            self.graphs[key] = (g, out)
        g, out = self.graphs[key]
        g.replay()
        return out

    def time(self, call, reps: int = 10, wall: bool = False) -> float:
        """Median seconds of call() after two warm-up calls: GPU time between CUDA events, or with
        wall=True the host's wall time up to a synchronize (launch and sync latency included)."""
        for _ in range(2):
            call()
        ts = []
        for _ in range(reps):
            if self.cuda and not wall:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                call()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                if self.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                call()
                if self.cuda:
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2]


def chain_parents(n: int) -> list[int]:
    """parents of a chain of n nodes (root included)."""
    return list(range(-1, n - 1))


class Verifier:
    """compile: the forward (mask, model, argmax) is torch.compile'd once with a symbolic token count M (M = 1
    compiles once more: dynamo specializes size 1), quantized matmuls and attention as opaque ops; every M then
    gets its CUDA graph of the compiled code."""

    def __init__(self, model, S: int, graphs: Graphs, tag: str, compile: bool = False):
        self.model, self.S, self.g, self.tag = model, S, graphs, tag
        dev = model.device
        self.L = torch.zeros(1, dtype=torch.long, device=dev)
        self.j = torch.arange(S, device=dev)
        self.shapes: dict = {}
        self.fwd = self._fwd
        if compile:
            self.fwd = llama.compile_step(model, self._fwd, fullgraph=True, dynamic=True)

    def _fwd(self, tm, depth, ids, ar, L, j):
        M = tm.shape[0]
        rel = j[None, :] - L                                             # [1, S] slot - L
        blk = tm.gather(1, rel.clamp(0, M - 1).expand(M, -1))           # [M, S] tree part
        mask = (rel < 0) | ((rel < M) & blk)
        logits, h = self.model(ids, L + depth, L + ar, mask)
        return logits.argmax(-1), h

    def _shape(self, parents):
        key = tuple(parents)
        if key not in self.shapes:
            dev, par = self.model.device, torch.tensor(parents, dtype=torch.long)
            M = par.numel()
            self.shapes[key] = (ancestor_mask(par).to(dev), positions(par).to(dev),
                                torch.randint(0, self.model.cfg.vocab_size, (M,), device=dev),
                                torch.arange(M, device=dev))
        return key

    def run(self, parents: list[int], L: int):
        key = self._shape(parents)
        tm, depth, ids, ar = self.shapes[key]
        self.L.fill_(L)
        return self.g((self.tag, "verify", key), lambda: self.fwd(tm, depth, ids, ar, self.L, self.j))


class Keeper:
    def __init__(self, model, P: int, graphs: Graphs, tag: str):
        self.model, self.P, self.g, self.tag = model, P, graphs, tag
        dev = model.device
        self.L = torch.zeros(1, dtype=torch.long, device=dev)
        self.src = torch.zeros(P, dtype=torch.long, device=dev)
        self.dst = torch.zeros(P, dtype=torch.long, device=dev)
        self.pre: dict = {}

    def run(self, path: list[int], L: int):
        """Move K/V of slots L+path[i] to L+i (path = root + accepted nodes)."""
        key = tuple(path)
        if key not in self.pre:
            pad = self.P - len(path)
            src = torch.tensor(list(path) + [0] * pad, device=self.model.device)
            dst = torch.tensor(list(range(len(path))) + [0] * pad, device=self.model.device)
            self.pre[key] = (src, dst)
        src, dst = self.pre[key]
        self.src.copy_(src)
        self.dst.copy_(dst)
        self.L.fill_(L)

        def fn():
            s, d = self.L + self.src, self.L + self.dst
            for layer in self.model.layers:
                layer.self_attn.cache.move(s, d)
        return self.g((self.tag, "keep"), fn)


class ChainDrafter:
    """compile: the 1-token draft step (forward + argmax) is torch.compile'd once (static shapes)."""

    def __init__(self, model, S: int, graphs: Graphs, tag: str, compile: bool = False):
        self.model, self.g, self.tag = model, graphs, tag
        dev = model.device
        self.L = torch.zeros(1, dtype=torch.long, device=dev)
        self.ids = torch.randint(0, model.cfg.vocab_size, (1,), device=dev)
        self.j = torch.arange(S, device=dev)
        self.one = self._one
        if compile:
            self.one = llama.compile_step(model, self._one, fullgraph=True, dynamic=False)

    def _one(self, x, pos, j):
        mask = j[None, :] <= pos[:, None]
        return self.model(x, pos, pos, mask, return_hidden=False).argmax(-1)

    def run(self, k: int, L: int):
        """k greedy draft tokens after the root at slot L (draft forwards at slots L..L+k-1)."""
        self.L.fill_(L)

        def fn():
            x, outs = self.ids, []
            for i in range(k):
                x = self.one(x, self.L + i, self.j)
                outs.append(x)
            return torch.cat(outs)
        return self.g((self.tag, "chain", k), fn)


class EagleDrafter:
    """compile: the commit (symbolic a) and the tree growth (one compile per tree shape) are torch.compile'd; under
    llama.COMPILE_BLOCKS only the head's decoder layer is (one compile for every tree shape: most of the
    whole-compile time of bench/e2e.py went to these tree steps)."""

    def __init__(self, head, S: int, graphs: Graphs, tag: str, top_k: int = 10, max_commit: int = 16,
                 compile: bool = False):
        self.head, self.g, self.tag, self.k = head, graphs, tag, top_k
        dev = head.fc.weight.device
        D, V = head.cfg.hidden_size, head.cfg.vocab_size
        self.L = torch.zeros(1, dtype=torch.long, device=dev)
        self.j = torch.arange(S, device=dev)
        self.ids = torch.randint(0, V, (max_commit,), device=dev)
        self.feats = torch.randn(max_commit, D, device=dev, dtype=head.dtype)   # target features of accepted nodes
        self.last = torch.zeros(D, device=dev, dtype=head.dtype)
        self.root_logp = torch.zeros(V, device=dev)
        self.commit_fn, self.tree_fn = self._commit, self._tree
        if compile and llama.COMPILE_BLOCKS:     # regional: the head's decoder layer compiled, the steps eager
            llama.compile_layers(head.layers)
        elif compile:
            self.commit_fn = torch.compile(self._commit, dynamic=True)
            self.tree_fn = torch.compile(self._tree, dynamic=False)

    def _commit(self, a: int):
        pos = self.L - a + torch.arange(a, device=self.L.device)
        mask = self.j[None, :] <= pos[:, None]
        out = self.head(self.ids[:a], self.feats[:a], pos, pos, mask)     # [a, D]
        self.last.copy_(out[-1])
        self.root_logp.copy_(torch.log_softmax(self.head.logits(out[-1]), dim=-1))

    def commit(self, a: int, L: int):
        """Head forward over the a tokens at slots L-a..L-1 (true target features); root distribution."""
        self.L.fill_(L)
        return self.g((self.tag, "commit", a), lambda: self.commit_fn(a))

    def _tree(self, depth: int, total: int):
        k, head = self.k, self.head
        dev = self.L.device
        rows = torch.arange(k, device=dev)
        bs, bt = self.root_logp.topk(k)                                  # beams: scores, tokens [k]
        feats = self.last.expand(k, -1)
        prefix = self.j[None, :] < self.L                                # [1, S]
        anc = torch.zeros(k, self.j.numel(), dtype=torch.bool, device=dev)
        sc, tk = [bs], [bt]
        for i in range(depth):
            slots = self.L + i * k + rows
            anc = anc | (self.j[None, :] == slots[:, None])
            out = head(bt, feats, (self.L + i).expand(k), slots, anc | prefix)   # [k, D]
            cs, ct = torch.log_softmax(head.logits(out), dim=-1).topk(k, dim=-1)  # [k, k]
            cum = (bs[:, None] + cs).reshape(-1)
            best = cum.topk(k).indices
            par = best // k
            bs, bt = cum[best], ct.reshape(-1)[best]
            feats, anc = out[par], anc[par]
            sc.append(cum)
            tk.append(ct.reshape(-1))
        keep = torch.cat(sc).topk(total - 1).indices.sort().values
        return torch.cat(tk)[keep]

    def tree(self, depth: int, total: int, L: int):
        """EAGLE-2 dynamic tree of `total` nodes (root included) grown from slot L: tokens [total-1]."""
        self.L.fill_(L)
        return self.g((self.tag, "tree", depth, total), lambda: self.tree_fn(depth, total))
