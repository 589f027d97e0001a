"""Speculative decoding engine: one loop for plain decoding, chains, trees, n-gram and hierarchical drafts.

    prefill prompt -> first token
    loop:  draft = proposer.propose(root)                 tree of N nodes, node 0 = root (last token)
           one target forward over the N nodes            slots L..L+N-1, positions L+depth, tree mask
           path, token = verify(draft, p)                 accepted nodes, then the bonus/recovered token
           keep K/V of root+path at slots L..             L += 1 + len(path)
           proposer.commit(root+path, hidden, token)

Plain decoding is the same loop with 1-node drafts (no proposer). Output at temperature 0 equals
plain greedy decoding; at T > 0 it is distributed as the target's sampling distribution.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import SpecqError
from .models.llama import KVCache, Transformer, block_mask, causal_mask
from .sampling import SamplingParams, probs, sample
from .spec.base import Draft, Proposer
from .spec.metrics import Clock, Metrics
from .spec.verify import verify

VERIFY_METHODS = ("greedy", "sampling", "rrs", "rrs-wo", "spechub", "target")


def verify_method_for(d: Draft, sp: SamplingParams, method: str | None = None) -> str:
    """Greedy at T=0; "target" for drafts without q; else the chosen method ("sampling" = the rule
    matching the draft's scheme). verify() raises SpecqError when a method is lossy for the draft."""
    if sp.greedy:
        return "greedy"
    if d.q is None:
        return "target"
    return method or "sampling"


def draw(p: torch.Tensor, sp: SamplingParams, gen) -> int:
    """p [V] target probabilities -> one token (argmax when greedy)."""
    return int(p.argmax()) if sp.greedy else int(sample(p, gen))


def forward_tree(model: Transformer, tokens: torch.Tensor, d: Draft, L: int):
    """Run a draft tree (tokens [N] on the model's device) at cache slots L..L+N-1 -> logits [N, V], hidden [N, D]."""
    dev, S, N = model.device, model.cache_size, len(d)
    if L + N > S:
        raise SpecqError(f"draft of {N} nodes at position {L} does not fit the cache of {S} slots")
    slots = torch.arange(L, L + N, device=dev)
    if N == 1:
        return model(tokens, slots, slots, causal_mask(L, 1, S, dev))
    pos = L + d.depths().to(dev)
    return model(tokens, pos, slots, block_mask(L, d.ancestor_mask().to(dev), S))


def verify_tree(model: Transformer, d: Draft, tokens: torch.Tensor, logits, sp, method, gen, L: int):
    """Verify a forwarded draft and keep its accepted path's K/V at slots L.. -> (acc, token, p).

    acc [a] long on device = node indices of root + accepted path (a = 1 + accepted drafts);
    p [N, V] = the model's probabilities at the nodes (None for a greedy 1-node draft)."""
    dev = model.device
    if len(d) == 1 and sp.greedy:                           # plain greedy step
        return torch.zeros(1, dtype=torch.long, device=dev), int(logits[0].argmax()), None
    p = probs(logits, sp)                                   # [N, V]
    if len(d) == 1:
        return torch.zeros(1, dtype=torch.long, device=dev), draw(p[0], sp, gen), p
    if d.q is not None and d.q.device != p.device:
        d.q = d.q.to(p.device)
    path, tok = verify(d, p, verify_method_for(d, sp, method), gen)
    acc = torch.tensor([0] + list(path), dtype=torch.long, device=dev)
    if path:
        model.keep(L + acc, torch.arange(L, L + acc.shape[0], device=dev))
    return acc, tok, p


class NoDraft(Proposer):
    """Plain decoding: every draft is the root alone."""
    name = "none"
    max_nodes = 1

    def propose(self, root, sp):
        return Draft(torch.tensor([root]), torch.tensor([-1]))


def owned_models(prop) -> list:
    """Transformers a proposer runs with their own caches (draft, intermediate), nested proposers included."""
    out = [m for m in (getattr(prop, "model", None), getattr(prop, "intermediate", None)) if isinstance(m, Transformer)]
    inner = getattr(prop, "tree_proposer", None)
    return out + (owned_models(inner) if inner is not None else [])


def ensure_cache(model: Transformer, size: int) -> None:
    """Make the model's static cache at least `size` slots, keeping its cache class (e.g. int8 KV)."""
    if model.cache_size >= size:
        return
    cls = type(model.layers[0].self_attn.cache) if model.cache_size else KVCache
    model.setup_cache(size, cache_cls=cls)


class SpecEngine:
    def __init__(self, target: Transformer, proposer: Proposer | None = None, sp: SamplingParams = SamplingParams(),
                 verify_method: str | None = None, max_len: int | None = None, seed: int | None = None):
        """verify_method None/"auto" picks the lossless verifier for each draft; at T=0 it is always greedy."""
        self.target, self.proposer, self.sp = target, proposer or NoDraft(), sp
        if verify_method in ("auto", "none"):
            verify_method = None
        if verify_method is not None and verify_method not in VERIFY_METHODS:
            raise SpecqError(f"unknown verify method {verify_method!r} (choose from: auto, {', '.join(VERIFY_METHODS)})")
        if verify_method == "greedy" and not sp.greedy:
            raise SpecqError("verify method 'greedy' is only lossless at temperature 0")
        self.verify_method = verify_method
        self.max_len = int(max_len or target.cfg.max_position_embeddings)
        for m in owned_models(self.proposer):
            if m is target:
                raise SpecqError("the draft/intermediate model must be a separate instance from the target "
                                 "(each keeps its own KV cache)")
            if m.cfg.vocab_size != target.cfg.vocab_size:
                raise SpecqError(f"draft vocabulary ({m.cfg.vocab_size}) differs from the target's ({target.cfg.vocab_size})")
        self.generator = torch.Generator(device=target.device)
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, eos_ids=(), stop: Callable[[list[int]], bool] | None = None,
                 stream: Callable[[int], bool] | None = None, seed: int | None = None):
        """-> (new token ids, Metrics). Stops after an EOS (included), max_new_tokens, stream(token) returning
        False, or stop(tokens so far) returning True (stop strings)."""
        T, prop, sp, gen = self.target, self.proposer, self.sp, self.generator
        dev = T.device
        if seed is not None:
            gen.manual_seed(seed)
        ids = torch.as_tensor(list(prompt_ids) if not torch.is_tensor(prompt_ids) else prompt_ids, dtype=torch.long).flatten()
        P = ids.shape[0]
        if P == 0:
            raise SpecqError("empty prompt")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SpecqError(f"invalid max_new_tokens {max_new_tokens!r}: must be an integer >= 1")
        if int(ids.min()) < 0 or int(ids.max()) >= T.cfg.vocab_size:
            raise SpecqError("prompt token ids out of the vocabulary range")
        extra = int(getattr(prop, "max_nodes", 64))
        need = P + max_new_tokens + extra
        if need > self.max_len:
            raise SpecqError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) + draft ({extra}) = {need} tokens "
                             f"exceeds the context of {self.max_len}")
        ensure_cache(T, min(self.max_len, -(-need // 256) * 256))
        S = T.cache_size
        if hasattr(prop, "setup"):
            prop.setup(S)
        if hasattr(prop, "generator"):
            prop.generator = gen
        eos = set(int(e) for e in eos_ids)
        out: list[int] = []

        def push(t: int) -> bool:  # emit one token; False = stop here
            out.append(t)
            if stream is not None and stream(t) is False:
                return False
            if stop is not None and stop(out):
                return False
            return t not in eos and len(out) < max_new_tokens

        clock = Clock(dev)
        m = Metrics(prompt_tokens=P)
        t0 = clock()
        ids = ids.to(dev)
        pos = torch.arange(P, device=dev)
        logits, hidden = T(ids, pos, pos, causal_mask(0, P, S, dev), logits_rows=slice(P - 1, P))
        first = draw(probs(logits[0], sp), sp, gen)
        t1 = clock()
        m.t_prefill = t1 - t0
        going = push(first)
        if going:
            prop.prefill(ids, hidden, first)
        t2 = clock()
        m.t_draft += t2 - t1
        L = P                                                   # tokens whose K/V the target cache holds
        while going:
            ta = clock()
            d = prop.propose(out[-1], sp)
            tb = clock()
            toks = d.tokens.to(dev)
            logits, hidden = forward_tree(T, toks, d, L)
            acc, tok, _ = verify_tree(T, d, toks, logits, sp, self.verify_method, gen, L)
            a = acc.shape[0]
            L += a
            new = toks[acc[1:]].tolist() + [tok] if a > 1 else [tok]
            tc = clock()
            m.record(len(d), a - 1)
            for t in new:
                going = push(t)
                if not going:
                    break
            td = clock()
            if going:
                prop.commit(toks[acc], hidden[acc], tok)
            te = clock()
            m.t_draft += (tb - ta) + (te - td)
            m.t_verify += tc - tb
        m.new_tokens = len(out)
        m.t_total = clock() - t0
        if hasattr(prop, "stats"):
            m.extra.update(prop.stats())
        return out, m
