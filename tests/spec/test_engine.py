"""SpecEngine: greedy speculative output == plain greedy (engine and a cache-free naive loop) for every
proposer, cache bookkeeping against brute force, metrics, errors, and lossless sampling at T > 0."""
import copy

import numpy as np
import pytest
import torch
from scipy.stats import chisquare, kstest

from specq.engine import SpecEngine
from specq.errors import SpecqError
from specq.models.config import ModelConfig
from specq.models.llama import Transformer, block_mask, causal_mask
from specq.sampling import SamplingParams, probs
from specq.spec.base import Draft
from specq.spec.draft_model import DraftModelProposer
from specq.spec.hier import HierProposer
from specq.spec.metrics import Metrics
from specq.spec.ngram import NgramProposer

V = 96


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab=V, layers=2, hidden=64, seed=0, sharp=1.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=4096)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharp)
    return m


def perturbed(m, scale, seed=1):
    """A correlated draft: the model with relative Gaussian noise on every weight."""
    g = torch.Generator().manual_seed(seed)
    d = copy.deepcopy(m)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return d


@torch.inference_mode()
def naive_greedy(model, prompt, n, eos=()):
    """Recompute the whole sequence every step (no cache reuse)."""
    seq = list(prompt)
    out = []
    model.setup_cache(len(prompt) + n + 1)
    for _ in range(n):
        L = len(seq)
        pos = torch.arange(L)
        logits = model(torch.tensor(seq), pos, pos, causal_mask(0, L, model.cache_size), return_hidden=False)
        t = int(logits[-1].argmax())
        out.append(t)
        seq.append(t)
        if t in eos:
            break
    return out


@pytest.fixture(scope="module")
def target():
    return tiny()


PROMPTS = [[3, 17, 17, 42, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3], [60]]


def proposers(t):
    yield "chain", DraftModelProposer(perturbed(t, 0.3), k=4)
    yield "chain-k1", DraftModelProposer(perturbed(t, 0.3, seed=5), k=1)
    yield "multi", DraftModelProposer(perturbed(t, 0.5, seed=2), k=3, n_drafts=2)
    yield "multi3", DraftModelProposer(perturbed(t, 0.5, seed=3), k=3, n_drafts=3, branch_depth=1)
    yield "ngram", NgramProposer(k=3)
    yield "hier", HierProposer(perturbed(t, 0.15, seed=4), DraftModelProposer(perturbed(t, 0.5, seed=6), k=2, n_drafts=2),
                               min_draft_length=4)


def test_plain_engine_matches_naive(target):
    for prompt in PROMPTS:
        ref = naive_greedy(target, prompt, 30)
        out, m = SpecEngine(target, None, SamplingParams()).generate(prompt, 30)
        assert out == ref
        assert m.tau == 1.0 and m.steps == 29 and m.new_tokens == 30


def test_greedy_lossless_every_proposer(target):
    refs = {i: naive_greedy(target, p, 40) for i, p in enumerate(PROMPTS)}
    for name, prop in proposers(target):
        eng = SpecEngine(target, prop, SamplingParams())
        taus = []
        for i, prompt in enumerate(PROMPTS):
            ref = refs[i]
            for n in (1, 7, 40):                      # max_new_tokens truncation inside accepted drafts
                out, m = eng.generate(prompt, n)
                assert out == ref[:n], (name, i, n)
                taus.append(m.tau)
            eos = ref[12]                             # EOS in the middle of an accepted draft
            out, _ = eng.generate(prompt, 40, eos_ids=(eos,))
            assert out == ref[:ref.index(eos) + 1], (name, i, "eos")
        if name != "ngram":
            assert max(taus) > 1.0, name              # correlated drafts do get accepted


def test_stream_stop_and_stop_callable(target):
    ref = naive_greedy(target, PROMPTS[0], 20)
    seen = []
    eng = SpecEngine(target, DraftModelProposer(perturbed(target, 0.2), k=4), SamplingParams())
    out, _ = eng.generate(PROMPTS[0], 20, stream=lambda t: (seen.append(t), len(seen) < 6)[1])
    assert out == ref[:6] and seen == out
    out, _ = eng.generate(PROMPTS[0], 20, stop=lambda toks: len(toks) >= 9)
    assert out == ref[:9]


def quantize(model):
    wq = pytest.importorskip("specq.quant.wq")
    q = copy.deepcopy(model)
    for layer in q.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    setattr(parent, name, wq.WQLinear.from_linear(mod, bits=4, group_size=32))
    return q


def test_greedy_lossless_quantized_target(target):
    qt = quantize(target)
    assert not any(type(m) is torch.nn.Linear for m in qt.layers.modules())
    for prompt in PROMPTS[:2]:
        ref = naive_greedy(qt, prompt, 30)
        for prop in (DraftModelProposer(copy.deepcopy(target), k=3), NgramProposer(3),
                     DraftModelProposer(perturbed(target, 0.3), k=2, n_drafts=2)):
            out, m = SpecEngine(qt, prop, SamplingParams()).generate(prompt, 30)
            assert out == ref


def test_identical_draft_accepts_everything(target):
    k = 4
    out, m = SpecEngine(target, DraftModelProposer(copy.deepcopy(target), k=k), SamplingParams()).generate(PROMPTS[0], 31)
    assert out == naive_greedy(target, PROMPTS[0], 31)
    assert m.steps == 6 and m.tau == k + 1 and m.acceptance == [1.0] * k


@torch.inference_mode()
def test_keep_accepted_tree_path_equals_brute_force(target):
    g = torch.Generator().manual_seed(0)
    S, P, N = 64, 9, 12
    ctx = torch.randint(0, V, (P,), generator=g)
    for trial in range(5):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, N)]
        d = Draft(torch.randint(0, V, (N,), generator=g), torch.tensor(parents))
        target.setup_cache(S)
        pos = torch.arange(P)
        target(ctx, pos, pos, causal_mask(0, P, S))
        target(d.tokens, P + d.depths(), torch.arange(P, P + N), block_mask(P, d.ancestor_mask(), S))
        leaf = int(torch.randint(1, N, (1,), generator=g))
        path = [leaf]
        while parents[path[-1]] > 0:
            path.append(parents[path[-1]])
        acc = torch.tensor([0] + path[::-1])
        target.keep(P + acc, P + torch.arange(acc.shape[0]))
        got = [(l.self_attn.cache.k[:, :P + len(acc)].clone(), l.self_attn.cache.v[:, :P + len(acc)].clone())
               for l in target.layers]
        full = torch.cat([ctx, d.tokens[acc]])
        target.setup_cache(S)
        pos = torch.arange(full.shape[0])
        target(full, pos, pos, causal_mask(0, full.shape[0], S))
        for (k, v), l in zip(got, target.layers):
            torch.testing.assert_close(k, l.self_attn.cache.k[:, :full.shape[0]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, l.self_attn.cache.v[:, :full.shape[0]], atol=1e-5, rtol=1e-5)


def test_metrics_arithmetic():
    m = Metrics()
    for n_nodes, a in ((5, 4), (5, 0), (5, 2), (5, 1)):
        m.record(n_nodes, a)
    assert m.steps == 4 and m.emitted == 11 and m.tau == 11 / 4 and m.drafted == 16
    assert m.acceptance == [3 / 4, 2 / 4, 1 / 4, 1 / 4]
    m.new_tokens, m.t_total, m.t_prefill, m.t_draft, m.t_verify = 12, 2.0, 0.5, 0.5, 0.75
    assert m.tokens_per_s == 6.0 and m.decode_tokens_per_s == 11 / 1.5 and m.t_other == 0.25
    s = m.summary()
    assert s["tau"] == 11 / 4 and s["time_s"]["other"] == 0.25 and s["acceptance"] == m.acceptance
    both = m + Metrics(steps=1, emitted=1, new_tokens=1, t_total=1.0, depth_hits=[])
    assert both.tau == 12 / 5 and both.acceptance == [3 / 5, 2 / 5, 1 / 5, 1 / 5] and both.new_tokens == 13
    assert "tau 2.75" in str(m) and "\n" not in str(m)
    assert Metrics().tau == 0.0 and Metrics().acceptance == []


def test_errors(target):
    with pytest.raises(SpecqError, match="context"):
        SpecEngine(target, DraftModelProposer(perturbed(target, 0.3), k=4), max_len=64).generate(list(range(20)), 40)
    with pytest.raises(SpecqError, match="separate instance"):
        SpecEngine(target, DraftModelProposer(target, k=2))
    with pytest.raises(SpecqError, match="verify method"):
        SpecEngine(target, None, SamplingParams(), verify_method="bogus")
    with pytest.raises(SpecqError, match="temperature 0"):
        SpecEngine(target, None, SamplingParams(1.0), verify_method="greedy")
    with pytest.raises(SpecqError, match="vocabulary"):
        SpecEngine(target, DraftModelProposer(tiny(vocab=50), k=2))
    eng = SpecEngine(target)
    with pytest.raises(SpecqError, match="empty"):
        eng.generate([], 5)
    with pytest.raises(SpecqError, match="vocabulary"):
        eng.generate([V + 3], 5)
    with pytest.raises(SpecqError, match="max_new_tokens"):
        eng.generate([1, 2], 0)
    with pytest.raises(SpecqError):  # a lossy method for the draft's scheme is refused, not run
        SpecEngine(target, DraftModelProposer(perturbed(target, 0.3), k=2, n_drafts=2, scheme="iid"),
                   SamplingParams(1.0), verify_method="spechub").generate([1, 2, 3], 5)


# ---------------------------------------------------------------------------------------------- T > 0
# Losslessness check: a speculative sample of n tokens must be distributed as the target's sampling
# distribution, i.e. every token x_t ~ p(. | prefix). The randomized probability integral transform
# u_t = F(x_t - 1) + U * p(x_t) (F = the CDF of p(. | prefix) over token ids, U ~ U(0,1)) is then i.i.d.
# uniform on (0, 1), so its histogram passes a chi-square test; p(. | prefix) is computed exactly from
# the target in one cache-free forward over the finished sequence. A plainly sampled draft model fails
# the same test (negative control), so the test has the power to see a lossy verifier.

TV = 12


@pytest.fixture(scope="module")
def small():
    t = tiny(vocab=TV, layers=1, hidden=32, seed=3, sharp=4.0)
    return t, perturbed(t, 0.6, seed=7)


@torch.inference_mode()
def dists(model, seq, sp):  # probs [n, V] of the token after each position of seq, cache-free
    n = seq.shape[0]
    model.setup_cache(n)
    pos = torch.arange(n)
    return probs(model(seq, pos, pos, causal_mask(0, n, n), return_hidden=False), sp)


def pit(model, ref, prompt, out, sp, rng):
    """Randomized PIT of each emitted token under the target, tokens ordered by q/p (q = the reference
    draft model's distribution): any bias toward the draft pushes u toward 0."""
    seq = torch.tensor(list(prompt) + list(out))
    p = dists(model, seq, sp)[len(prompt) - 1:-1]                            # [n, V]
    q = dists(ref, seq, sp)[len(prompt) - 1:-1]
    x = torch.tensor(out)
    px = p.gather(1, x[:, None])[:, 0]
    assert bool((px > 0).all()), "emitted a token outside the target's support"
    key = torch.where(p > 0, q / p.clamp_min(1e-30), torch.full_like(p, -1.0))
    order = key.argsort(dim=1, descending=True, stable=True)                     # [n, V]
    rank = order.argsort(dim=1).gather(1, x[:, None])                             # [n, 1] rank of x
    cum = torch.cumsum(p.gather(1, order), 1)                                 # [n, V] mass by rank
    below = cum.gather(1, rank)[:, 0] - px
    return (below + torch.tensor(rng.random(len(out))) * px).clamp(0, 1).numpy()


def pit_pvalue(model, ref, runs, sp, bins=10):
    rng = np.random.default_rng(0)
    u = np.concatenate([pit(model, ref, pr, out, sp, rng) for pr, out in runs])
    hist = np.histogram(u, bins=bins, range=(0, 1))[0]
    return min(1.0, 2 * min(chisquare(hist).pvalue, kstest(u, "uniform").pvalue)), len(u)  # Bonferroni


def spec_runs(target, prop, sp, n_tokens=320, prompts=((1, 5, 2), (7, 7, 3, 0), (4,), (9, 10, 11, 2, 2)), seed=0):
    eng = SpecEngine(target, prop, sp, seed=seed)
    runs, taus = [], []
    for pr in prompts:
        out, m = eng.generate(list(pr), n_tokens)
        runs.append((pr, out))
        taus.append(m.tau)
    return runs, float(np.mean(taus))


def t_proposers(draft, target):
    """(name, proposer, sampling params, the model whose q the drafts follow)"""
    yield "chain", DraftModelProposer(copy.deepcopy(draft), k=3), SamplingParams(1.0), draft
    yield "chain-topk", DraftModelProposer(copy.deepcopy(draft), k=3), SamplingParams(0.8, top_k=4, top_p=0.9), draft
    yield "rrs", DraftModelProposer(copy.deepcopy(draft), k=2, n_drafts=3, scheme="iid"), SamplingParams(1.0), draft
    yield "rrs-wo", DraftModelProposer(copy.deepcopy(draft), k=2, n_drafts=3, scheme="wo"), SamplingParams(1.0), draft
    yield "spechub", DraftModelProposer(copy.deepcopy(draft), k=3, n_drafts=2, scheme="spechub"), SamplingParams(1.0), draft
    yield "rrs-wo-topk2", DraftModelProposer(copy.deepcopy(draft), k=2, n_drafts=3, scheme="wo"), \
        SamplingParams(1.0, top_k=2), draft                  # fewer tokens than drafts: absent siblings pruned
    yield "spechub-tail", DraftModelProposer(copy.deepcopy(draft), k=3, n_drafts=2, scheme="spechub", branch_depth=1), \
        SamplingParams(1.0), draft                           # one level of pairs, then chains
    yield "ngram", NgramProposer(k=3, max_ngram=2), SamplingParams(1.0), draft
    inter = perturbed(target, 0.6, seed=11)
    yield "hier", HierProposer(copy.deepcopy(inter), DraftModelProposer(copy.deepcopy(draft), k=2, n_drafts=2,
                               scheme="spechub"), min_draft_length=3), SamplingParams(1.0), inter


@pytest.mark.parametrize("which", ["chain", "chain-topk", "rrs", "rrs-wo", "rrs-wo-topk2", "spechub", "spechub-tail",
                                   "ngram", "hier"])
def test_sampling_is_lossless(small, which):
    target, draft = small
    name, prop, sp, ref = next(x for x in t_proposers(draft, target) if x[0] == which)
    runs, tau = spec_runs(target, prop, sp)
    pv, n = pit_pvalue(target, ref, runs, sp)
    assert n == 4 * 320
    assert pv > 1e-3, (name, pv)
    if name != "ngram":
        assert 1.2 < tau, (name, tau)               # drafts were accepted and rejected: both paths ran


def test_pit_has_power(small):
    """Negative control: the draft model's own samples fail the target test."""
    target, draft = small
    runs, _ = spec_runs(draft, None, SamplingParams(1.0))
    pv, _ = pit_pvalue(target, draft, runs, SamplingParams(1.0))
    assert pv < 1e-6


def test_pit_detects_classic_lossy_verifier(small, monkeypatch):
    """Power: resampling from p (instead of the residual) after a rejection, the textbook bug, fails."""
    import specq.engine as E
    target, draft = small

    def lossy(d, p, method, generator=None):
        path, i = [], 0
        while i + 1 < len(d):
            x = int(d.tokens[i + 1])
            if float(torch.rand(1, generator=generator)) * float(d.q[i, x]) >= float(p[i, x]):
                break
            path.append(i + 1)
            i += 1
        return path, int(torch.multinomial(p[i], 1, generator=generator))

    monkeypatch.setattr(E, "verify", lossy)
    runs, _ = spec_runs(target, DraftModelProposer(copy.deepcopy(draft), k=3), SamplingParams(1.0))
    pv, _ = pit_pvalue(target, draft, runs, SamplingParams(1.0))
    assert pv < 1e-6


def test_greedy_lossless_compiled_steps():
    """compile_steps (what LLM(compile=True) and `bench spec --compile` call): the target's and draft models'
    TreeRunners and the EAGLE steps torch.compile'd; greedy output still equals plain greedy decoding."""
    from specq.engine import compile_steps
    from specq.spec.eagle import EagleHead, EagleProposer
    from specq.spec.graphs import runner_for
    t = tiny(seed=7)                                   # its own model: runners live on the model
    refs = [naive_greedy(t, p, 20) for p in PROMPTS[:2]]
    head = EagleHead(t.cfg).bind(t).eval()
    for name, prop in (("chain", DraftModelProposer(perturbed(t, 0.3), k=3)),
                       ("eagle", EagleProposer(head, t, top_k=3, depth=3, total_tokens=10))):
        compile_steps(t, prop)
        assert runner_for(t).compile
        assert runner_for(prop.model).compile if name == "chain" else prop.compiled
        eng = SpecEngine(t, prop, SamplingParams())
        for prompt, ref in zip(PROMPTS[:2], refs):
            out, _ = eng.generate(prompt, 20)
            assert out == ref, name


def test_cache_growth_doubles_and_compiled_steps_do_not_recompile():
    """A cache that must grow at least doubles (few regrowths, each a graph capture / recompile); compile_steps
    reserves 2048 slots, so prompts of any length below that reuse the compiled code (dynamo compiles nothing new)."""
    import torch._dynamo.utils as du
    from specq.engine import compile_steps, ensure_cache
    t = tiny(seed=9)
    t.setup_cache(256)
    ensure_cache(t, 300, cap=4096)
    assert t.cache_size == 512
    ensure_cache(t, 3000, cap=4096)
    assert t.cache_size == 3000
    ensure_cache(t, 3100, cap=4096)
    assert t.cache_size == 4096
    t = tiny(seed=10)
    ref = naive_greedy(t, PROMPTS[1], 12)             # (sets its own small cache: before compile_steps)
    prop = DraftModelProposer(perturbed(t, 0.3), k=3)
    compile_steps(t, prop)
    assert t.cache_size == 2048 and prop.model.cache_size == 2048
    eng = SpecEngine(t, prop, SamplingParams())
    out, _ = eng.generate(PROMPTS[1], 12)
    assert out == ref
    before = du.counters["stats"]["unique_graphs"]
    for P in (40, 300, 900):
        out, _ = eng.generate([1 + (j % 90) for j in range(P)], 12)
    assert du.counters["stats"]["unique_graphs"] == before


def test_greedy_lossless_compiled_blocks(monkeypatch):
    """--compile-blocks (specq.models.llama.COMPILE_BLOCKS): the plain Decoder, the W4A16 target's and the draft
    model's runners and the EAGLE steps over regionally compiled layers (several models, token counts and cache sizes
    through one compiled Block.forward) never hit dynamo's recompile limit, and greedy output equals plain greedy."""
    import torch._dynamo
    from specq.engine import compile_steps
    from specq.generate import Decoder
    from specq.models import llama
    from specq.spec.eagle import EagleHead, EagleProposer
    from specq.spec.graphs import runner_for
    from specq.quant import opaque, quantize_model
    t = tiny(seed=11)
    quantize_model(t, fmt="w4a16", method="rtn", group_size=32, fit_group=True, progress=False)
    refs = [naive_greedy(t, p, 20) for p in PROMPTS[:2]]
    head = EagleHead(t.cfg).bind(t).eval()
    monkeypatch.setattr(opaque, "FORCE", True)                  # quantized Linears as the opaque op, as on CUDA
    monkeypatch.setattr(llama, "COMPILE_BLOCKS", True)
    torch._dynamo.reset()
    dec = Decoder(t, 64, cuda_graph=False, compile=True)         # plain decoding compiled first, as bench spec does
    tok = int(dec.prefill(torch.tensor(PROMPTS[0])).argmax())
    assert tok == refs[0][0]
    for name, prop in (("chain", DraftModelProposer(perturbed(t, 0.3), k=3)),
                       ("eagle", EagleProposer(head, t, top_k=3, depth=3, total_tokens=10))):
        compile_steps(t, prop)
        assert runner_for(t).compile and t.layers[0]._compiled_call_impl is not None
        assert torch._dynamo.config.recompile_limit >= 64       # the GPU run that hit the default 8 (session 8)
        eng = SpecEngine(t, prop, SamplingParams())
        for prompt, ref in zip(PROMPTS[:2], refs):
            out, _ = eng.generate(prompt, 20)
            assert out == ref, name
    torch._dynamo.reset()
