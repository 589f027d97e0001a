"""Prompt-lookup (n-gram) proposer: no model. Find the most recent earlier occurrence of the context's
last n tokens (n from max_ngram down to min_ngram) and propose the up to k tokens that followed it.
Drafts carry no q: verify greedily at T=0 and with the target-only sampler at T>0."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SpecqError
from .base import Draft, Proposer


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, k: int = 4, max_ngram: int = 3, min_ngram: int = 1):
        for n, v in (("k", k), ("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecqError(f"invalid n-gram {n}={v!r}: must be an integer >= 1")
        if min_ngram > max_ngram:
            raise SpecqError(f"invalid n-gram sizes: min_ngram={min_ngram} > max_ngram={max_ngram}")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram
        self.max_nodes = k + 1
        self.buf = np.zeros(256, dtype=np.int64)   # committed context tokens (root excluded)
        self.n = 0

    def _append(self, toks) -> None:
        toks = np.asarray(toks, dtype=np.int64).reshape(-1)
        if self.n + toks.size + 1 > self.buf.size:
            self.buf = np.concatenate([self.buf, np.zeros(max(self.buf.size, toks.size + 1), dtype=np.int64)])
        self.buf[self.n:self.n + toks.size] = toks
        self.n += toks.size

    def prefill(self, prompt, hidden, first):
        self.n = 0
        self._append(prompt.tolist())

    def lookup(self, seq: np.ndarray) -> np.ndarray:
        """seq [L] (context + root) -> continuation [<= k] of the last n-gram's latest earlier occurrence."""
        L = seq.shape[0]
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            win = np.lib.stride_tricks.sliding_window_view(seq[:L - 1], n)    # [L-n, n] starts 0..L-1-n
            hit = np.flatnonzero((win == seq[L - n:]).all(1))
            if hit.size:
                s = int(hit[-1]) + n
                return seq[s:s + self.k]
        return seq[:0]

    def propose(self, root: int, sp) -> Draft:
        self.buf[self.n] = root                                                # room kept by _append
        cont = self.lookup(self.buf[:self.n + 1])
        toks = torch.tensor([root] + cont.tolist(), dtype=torch.long)
        return Draft(toks, torch.arange(-1, toks.shape[0] - 1), None, "iid")

    def commit(self, tokens, hidden, nxt):
        self._append(tokens.tolist())

    def rollback(self, n: int) -> None:
        self.n = min(self.n, n)
