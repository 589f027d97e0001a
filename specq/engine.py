"""Speculative decoding engine: one loop for plain decoding, chains, trees, n-gram and hierarchical drafts.

    prefill prompt -> first token
    loop:  draft = proposer.propose(root)                 tree of N nodes, node 0 = root (last token)
           one target forward over the N nodes            slots L..L+N-1, positions L+depth, tree mask
           path, token = verify(draft, p)                 accepted nodes, then the bonus/recovered token
           keep K/V of root+path at slots L..             L += 1 + len(path)
           proposer.commit(root+path, hidden, token)

Plain decoding is the same loop with 1-node drafts (no proposer). Output at temperature 0 equals
plain greedy decoding; at T > 0 it is distributed as the target's sampling distribution.

On GPU the target's tree forward is a CUDA graph per padded draft size (spec/graphs.py); for greedy
and target-sampled walks (T=0, n-gram / EAGLE drafts at T>0) the walk and the K/V move run inside the
same graph, and the step costs one host sync (reading the accepted tokens). Sampled multi-draft rules
(rrs, rrs-wo, spechub) verify eagerly on the graph's logits.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import SpecqError
from .models.llama import KVCache, Transformer, causal_mask
from .sampling import SamplingParams, probs, sample
from .spec.base import Draft, Proposer
from .spec.graphs import bucket, runner_for
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


def tree_arrays(d: Draft, dev):
    """(parents, depth, ancestor mask) of a draft on dev; precomputed ones are used as they are."""
    par = d.parents.to(dev)
    if d.depth is not None and d.anc is not None:
        return par, d.depth.to(dev), d.anc.to(dev)
    n = len(d)
    if d.is_chain():
        return par, torch.arange(n, device=dev), torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    return par, d.depths().to(dev), d.ancestor_mask().to(dev)


def step_tree(model: Transformer, d: Draft, L: int, sp: SamplingParams, method: str | None, gen, runner=None):
    """One verification of draft d (N nodes) at cache slots L..L+N-1: forward, verify, keep the accepted
    path's K/V at slots L..

    -> (new, acc, toks, hidden, logits): new = accepted draft tokens then the emitted next token (host list);
    acc [a] long on device = node indices of root + accepted path; toks [>= N], hidden [>= N, D], logits
    [>= N, V] = the forward's ids / final-norm features / logits (static buffers on GPU: use before the
    next step). Greedy and target-sampled walks run inside the forward's CUDA graph (one host sync)."""
    dev, S, N = model.device, model.cache_size, len(d)
    if L + N > S:
        raise SpecqError(f"draft of {N} nodes at position {L} does not fit the cache of {S} slots")
    runner = runner or runner_for(model)
    rule = verify_method_for(d, sp, method)
    par, depth, anc = tree_arrays(d, dev)
    if rule in ("greedy", "target"):
        logits, hidden, res, idx, toks = runner.tree(d.tokens, par, depth, anc, L, rule, sp, gen)
        r = res.tolist()
        a = r[0]
        return r[3:2 + a] + [r[1]], idx[:a], toks, hidden, logits
    logits, hidden, _, _, toks = runner.tree(d.tokens, par, depth, anc, L)
    p = probs(logits[:N], sp)                                               # [N, V]
    if d.q is not None and d.q.device != p.device:
        d.q = d.q.to(p.device)
    path, tok = verify(d, p, rule, gen)
    acc = torch.tensor([0] + list(path), dtype=torch.long, device=dev)
    if path:
        model.keep(L + acc, torch.arange(L, L + acc.shape[0], device=dev))
    new = (toks[acc[1:]].tolist() if path else []) + [tok]
    return new, acc, toks, hidden, logits


class NoDraft(Proposer):
    """Plain decoding: every draft is the root alone."""
    name = "none"
    max_nodes = 1

    def propose(self, root, sp):
        return Draft(torch.tensor([root]), torch.tensor([-1]), depth=torch.zeros(1, dtype=torch.long),
                     anc=torch.ones(1, 1, dtype=torch.bool))


def owned_models(prop) -> list:
    """Transformers a proposer runs with their own caches (draft, intermediate), nested proposers included."""
    out = [m for m in (getattr(prop, "model", None), getattr(prop, "intermediate", None)) if isinstance(m, Transformer)]
    inner = getattr(prop, "tree_proposer", None)
    return out + (owned_models(inner) if inner is not None else [])


def compile_steps(target: Transformer, prop, reserve: int = 2048) -> None:
    """torch.compile the static-shape steps the speculative loop runs (GPU): the target's and every owned
    model's TreeRunner, and EAGLE heads' append / grow steps (nested proposers included). Compiled code is
    specialized to the cache size, so the caches are made `reserve` slots long (at most the context) up front."""
    from .spec.graphs import runner_for
    for m in [target] + owned_models(prop):
        ensure_cache(m, min(reserve, m.cfg.max_position_embeddings))
        runner_for(m, compile=True)
    p = prop
    while p is not None:
        if hasattr(p, "enable_compile"):
            p.enable_compile()
        p = getattr(p, "tree_proposer", None)


def ensure_cache(model: Transformer, size: int, cap: int | None = None) -> None:
    """Make the model's static cache at least `size` slots, keeping its cache class (e.g. int8 KV). A cache that
    has to grow at least doubles (up to cap): every new size costs CUDA-graph captures, and compiled steps a
    recompile, so a server seeing longer and longer prompts regrows O(log) times, not once per prompt."""
    if model.cache_size >= size:
        return
    cls = type(model.layers[0].self_attn.cache) if model.cache_size else KVCache
    grown = max(size, min(cap or size, 2 * model.cache_size))
    model.setup_cache(grown, cache_cls=cls)


class SpecEngine:
    def __init__(self, target: Transformer, proposer: Proposer | None = None, sp: SamplingParams = SamplingParams(),
                 verify_method: str | None = None, max_len: int | None = None, seed: int | None = None,
                 split_times: bool | None = None):
        """verify_method None/"auto" picks the lossless verifier for each draft; at T=0 it is always greedy.
        split_times: synchronize the GPU at every phase boundary so Metrics' draft / verify split is exact
        (default: only off CUDA; on CUDA the split is host time and the GPU runs ahead)."""
        self.target, self.proposer, self.sp = target, proposer or NoDraft(), sp
        self.split_times = target.device.type != "cuda" if split_times is None else split_times
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
        # + padding of the largest draft to its bucket + the scratch slot padded rows write (spec/graphs.py)
        ensure_cache(T, min(self.max_len, -(-(need - extra + bucket(extra) + 1) // 256) * 256), cap=self.max_len)
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

        clock = Clock(dev, sync=self.split_times)
        runner = runner_for(T)
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
        L, root = P, first                                      # tokens whose K/V the target cache holds
        while going:
            ta = clock()
            d = prop.propose(root, sp)
            tb = clock()
            new, acc, toks, hidden, _ = step_tree(T, d, L, sp, self.verify_method, gen, runner)
            a = acc.shape[0]
            L += a
            tc = clock()
            m.record(len(d), a - 1)
            for t in new:
                going = push(t)
                if not going:
                    break
            td = clock()
            root = new[-1]
            if going:
                prop.commit(toks[acc], hidden[acc], root)
            te = clock()
            m.t_draft += (tb - ta) + (te - td)
            m.t_verify += tc - tb
        m.new_tokens = len(out)
        m.t_total = clock() - t0
        if hasattr(prop, "stats"):
            m.extra.update(prop.stats())
        return out, m
