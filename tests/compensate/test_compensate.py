import copy

import pytest
import torch
import torch.nn as nn

from specq.compensate import (CompensatedLinear, Residual, apply_compensation, approx_topk, chunking,
                              compensate_model, exact_topk, keep_fp_weights, parse_spec, recall,
                              set_k_fraction, tune_budget)
from specq.compensate import select as SEL
from specq.compensate.residual import pack_rows, sym4_scales, unpack_rows
from specq.errors import SpecqError
from specq.models.config import ModelConfig
from specq.models.llama import Transformer, causal_mask
from specq.quant import quantize_model
from specq.quant.wq import WQLinear


def heavy(M, K, g=None):
    """Activations with LLM-like outlier channels: gaussian rows times a fixed heavy-tailed channel scale."""
    g = g or torch.Generator().manual_seed(1)
    ch = torch.exp(torch.randn(K, generator=g) * 1.0)
    return torch.randn(M, K, generator=g) * ch


def qlayer(K=256, N=96, bits=3, gs=32, bias=False):
    lin = nn.Linear(K, N, bias=bias)
    return lin, WQLinear.from_linear(lin, bits, gs)


def test_chunking():
    assert chunking(576) == (1, 576)
    assert chunking(4096) == (4, 1024)
    assert chunking(14336) == (14, 1024)
    n, C = chunking(1536)
    assert n * C == 1536 and C <= 1024


def test_residual_pack_and_mse_scale():
    q = torch.randint(0, 16, (40, 64))
    assert torch.equal(unpack_rows(pack_rows(q)), q)
    R = torch.randn(64, 300) * torch.rand(64, 1)
    R[:, 0] *= 20                                       # outliers: clipping should help
    s = sym4_scales(R)

    def err(s):
        return (R - torch.clamp(torch.round(R / s[:, None]), -8, 7) * s[:, None]).pow(2).sum(1)
    full = R.abs().amax(1) / 7
    assert (err(s) <= err(full) + 1e-6).all() and err(s).sum() < 0.9 * err(full).sum()


def test_residual_layout_and_error():
    lin, wq = qlayer()
    W, Wq = lin.weight.data, wq.dequantize()
    res = Residual.from_weights(W, Wq)
    K, N = 256, 96
    assert res.codes.shape == (K, N // 8) and res.codes.dtype == torch.int32
    assert res.codes.is_pinned() == torch.cuda.is_available()
    R = (W - Wq).t()                                    # [K, N]
    Rq = res.rows(torch.arange(K))
    assert Rq.shape == (K, N)
    assert (Rq - R).norm() < 0.15 * R.norm()            # 4-bit residual keeps most of the error
    assert torch.allclose(res.rows(torch.tensor([3, 7])), Rq[[3, 7]])


@pytest.mark.parametrize("selector", ["exact", "approx"])
def test_reference_math(selector, monkeypatch):
    lin, wq = qlayer(bias=True)
    res = Residual.from_weights(lin.weight.data, wq.dequantize())
    stats = SEL.calib_stats(heavy(256, 256))
    cl = CompensatedLinear(wq, res, k_chunk=12, selector=selector, stats=stats)
    x = heavy(7, 256, torch.Generator().manual_seed(5))
    y = cl(x)
    Rall = res.rows(torch.arange(256))
    idx = exact_topk(x, 12) if selector == "exact" else approx_topk(x, cl.thr, 12)
    for m in range(7):
        S = idx[m]
        assert S.unique().numel() == 12
        ref = wq(x[m:m + 1])[0] + x[m, S] @ Rall[S]
        assert torch.allclose(y[m], ref, atol=1e-5, rtol=1e-5)
    # the long-input path (blocks of rows gathered from the cached dequantized residual) gives the same numbers
    big = heavy(100, 256, torch.Generator().manual_seed(6))
    idx = cl.select(big)
    r_gather = cl.correction(big, idx)
    from specq.compensate import linear as L
    monkeypatch.setattr(L, "GATHER_MAX", 12 * 96 * 7)                   # 7 token rows per block: 15 blocks
    r_blocks = cl.correction(big, idx)
    assert torch.allclose(r_blocks, r_gather, atol=1e-5, rtol=1e-5)
    assert torch.allclose(r_gather, torch.einsum("mk,mkn->mn", torch.gather(big, 1, idx), res.rows(idx)))


def test_all_channels_exact_residual_is_fp():
    lin, wq = qlayer(K=128, N=64, bits=3, gs=32, bias=True)
    res = Residual.from_weights(lin.weight.data, wq.dequantize(), bits=None)
    cl = CompensatedLinear(wq, res, k=128, selector="exact")
    x = torch.randn(5, 128)
    assert not torch.allclose(wq(x), lin(x), atol=1e-3)
    assert torch.allclose(cl(x), lin(x), atol=1e-5)


def test_compensation_reduces_error():
    lin, wq = qlayer(K=512, N=128, bits=3, gs=64)
    res = Residual.from_weights(lin.weight.data, wq.dequantize())
    x = heavy(64, 512)
    e0 = (wq(x) - lin(x)).norm()
    errs = [(CompensatedLinear(wq, res, k_chunk=k)(x) - lin(x)).norm() for k in (8, 32, 128)]
    assert errs[0] < e0 and errs[1] < errs[0] and errs[2] < errs[1]


def test_approx_recall_floor():
    K, k = 2048, 10                                     # 2 chunks of 1024, k_chunk 5 (the paper's range)
    x_cal, x = heavy(1024, K), heavy(256, K, torch.Generator().manual_seed(9))
    x = x * torch.exp(0.3 * torch.randn(256, 1))        # token-level scale drift vs calibration
    x_cal = torch.cat([x_cal, x_cal[:1] * 0])           # an all-zero row must not break calibration
    thr = SEL.thresholds(SEL.calib_stats(x_cal), k // 2)
    idx = approx_topk(x, thr, k // 2)
    assert idx.shape == (256, k)
    n, C = chunking(K)
    assert ((idx // C).sort(1).values == torch.arange(n).repeat_interleave(k // 2)).all()   # k_chunk per chunk
    assert all(r.unique().numel() == k for r in idx)
    ref = torch.stack([torch.cat([c.abs().topk(k // 2).indices + j * C for j, c in enumerate(row.view(n, C))])
                       for row in x])
    rc = recall(idx, ref)
    assert rc >= 0.75, rc
    # vs the global exact top-k (the reference the paper's approximation is measured against)
    assert recall(idx, exact_topk(x, k)) >= 0.6
    # a static (offline) choice of channels is far worse: the point of choosing at run time
    static = x_cal.abs().mean(0).topk(k).indices.expand(256, k)
    assert recall(static, exact_topk(x, k)) < rc


def test_rows_get_own_salient_sets():
    lin, wq = qlayer()
    res = Residual.from_weights(lin.weight.data, wq.dequantize())
    for sel in ("exact", "approx"):
        cl = CompensatedLinear(wq, res, k_chunk=9, selector=sel, stats=SEL.calib_stats(heavy(128, 256)))
        x = heavy(6, 256, torch.Generator().manual_seed(3))
        batched = cl(x)
        single = torch.cat([cl(x[i:i + 1]) for i in range(6)])
        assert torch.allclose(batched, single, atol=1e-5)
        sets = cl.select(x).sort(1).values
        assert not all(torch.equal(sets[0], sets[i]) for i in range(1, 6))


def tiny(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256)
    m = Transformer(cfg).eval()
    with torch.no_grad():                                # outlier input channels, as in real LLMs
        for layer in m.layers:
            layer.input_layernorm.weight.mul_(torch.exp(torch.randn(64)))
    return m


def quantized(fp, bits=3):
    q = copy.deepcopy(fp)
    with keep_fp_weights() as fpw:
        quantize_model(q, f"w{bits}a16", "rtn", group_size=32, progress=False)
    return q, fpw


def logits_of(m, ids):
    L = ids.numel()
    m.setup_cache(L)
    pos = torch.arange(L)
    with torch.inference_mode():
        return m(ids, pos, pos, causal_mask(0, L, L), return_hidden=False)


def test_compensate_model_full_and_exact_is_fp():
    fp = tiny()
    q, fpw = quantized(fp)
    assert len(fpw) == 8
    ids = torch.randint(0, 97, (12,))
    ref = logits_of(fp, ids)
    assert not torch.allclose(logits_of(q, ids), ref, atol=1e-3)
    compensate_model(q, fp, k_fraction=1.0, selector="exact", bits=None)     # fp given as a model
    assert torch.allclose(logits_of(q, ids), ref, atol=1e-4)


def test_compensate_model_approx_improves_and_tunes():
    fp = tiny()
    q, fpw = quantized(fp)
    ids = torch.randint(0, 97, (40,))
    ref = logits_of(fp, ids)
    e0 = (logits_of(q, ids) - ref).norm()
    calib = torch.randint(0, 97, (4, 32))
    compensate_model(q, fpw, k_fraction=0.25, selector="approx", calib=calib)
    e1 = (logits_of(q, ids) - ref).norm()
    set_k_fraction(q, {"qkv_proj": 0.5, "o_proj": 0.5, "gate_up_proj": 0.5, "down_proj": 0.5})
    e2 = (logits_of(q, ids) - ref).norm()
    assert e2 < e1 < e0
    assert q.layers[0].mlp.down_proj.k == 64 and q.layers[1].self_attn.qkv_proj.k == 32

    cost = {"qkv_proj": 0.01, "o_proj": 0.002, "gate_up_proj": 0.004, "down_proj": 0.02}   # slowdown per channel

    def fake_measure(cl, kc):
        proj = next(p for p in cost if cl is getattr(q.layers[0].self_attn, p, None) or
                    cl is getattr(q.layers[0].mlp, p, None))
        return 1.0 + cost[proj] * kc
    chosen = tune_budget(q, 0.05, measure=fake_measure, scope="linear")
    # largest k per chunk in the ladder with cost * k <= 5%
    assert q.layers[1].self_attn.qkv_proj.k_chunk == 4 and q.layers[1].self_attn.o_proj.k_chunk == 24
    assert q.layers[0].mlp.gate_up_proj.k_chunk == 12 and q.layers[0].mlp.down_proj.k_chunk == 2
    assert chosen["o_proj"] == 24 / 64


def test_tuner_layer_scope_most_channels_within_the_layer_budget():
    """budget=5% (scope=layer): the k per projection with the most channels whose summed extra time fits 5% of the
    layer's summed base time (here 80 channels against 42 with each Linear held to 5% on its own); when the layer
    timed as a chain is slower than the sum says, the choice shrinks until the chain fits."""
    import itertools

    from specq.compensate.tune import K_CHUNKS, tune_layer
    fp = tiny()
    q, fpw = quantized(fp)
    compensate_model(q, fpw, k_fraction=0.25, selector="approx", calib=torch.randint(0, 97, (4, 32)))
    cost = {"qkv_proj": 0.01, "o_proj": 0.002, "gate_up_proj": 0.004, "down_proj": 0.02}
    lay = q.layers[0]
    mods = {"qkv_proj": lay.self_attn.qkv_proj, "o_proj": lay.self_attn.o_proj, "gate_up_proj": lay.mlp.gate_up_proj,
            "down_proj": lay.mlp.down_proj}
    proj_of = {id(cl): p for p, cl in mods.items()}
    calls = []

    def fake_measure(cl, kc):
        return 1.0 + cost[proj_of[id(cl)]] * kc

    def fake_chain(factor):
        def chain(layers, ks):
            calls.append(dict(ks))
            assert len(layers) in (1, 2)                     # tune_budget checks both layers of the model
            return 4.0 + factor * sum(cost[p] * ks.get(p, 0) for p in layers[0])
        return chain
    # brute force over the ladder: most channels (every projection here is one chunk) with sum(cost * k) <= 0.2
    lad = [0] + [k for k in K_CHUNKS if k <= 64]
    best = max((c for c in itertools.product(lad, repeat=4)
                if sum(cost[p] * k for p, k in zip(mods, c)) <= 0.2 + 1e-12), key=sum)
    assert sum(best) == 80
    chosen = tune_budget(q, 0.05, measure=fake_measure, chain=fake_chain(1.0))
    ks = {p: cl.k_chunk for p, cl in mods.items()}
    assert ks == {"qkv_proj": 0, "o_proj": 64, "gate_up_proj": 16, "down_proj": 0}
    assert q.layers[1].self_attn.o_proj.k_chunk == 64 and q.layers[1].mlp.gate_up_proj.k_chunk == 16
    assert chosen["o_proj"] == 1.0 and chosen["qkv_proj"] == 0.0
    assert calls[-1] == ks                                   # the choice was timed as a chain, and it fit
    # the chain costs twice what the sum says: 9.6% > 5%, so the allowed extra shrinks to 0.2 * 0.9 * 5 / 9.6
    calls.clear()
    ks2 = tune_layer(mods, 0.05, measure=fake_measure, chain=fake_chain(2.0))
    assert ks2 == {"qkv_proj": 0, "o_proj": 32, "gate_up_proj": 6, "down_proj": 0}
    assert 2 * sum(cost[p] * k for p, k in ks2.items()) / 4.0 <= 0.05
    assert len(calls) == 4                                   # two rounds of (base, choice)
    with pytest.raises(SpecqError, match="scope"):
        tune_budget(q, 0.05, measure=fake_measure, scope="step")
    # a chain that never fits: nothing is compensated
    assert not any(tune_layer(mods, 0.05, measure=fake_measure, chain=fake_chain(100.0)).values())
    # the real timer runs the four Linears and leaves each module's k as it was
    from specq.compensate.tune import measure_chain
    before = {p: cl.k_chunk for p, cl in mods.items()}
    assert measure_chain([mods], {"o_proj": 2, "down_proj": 4}, reps=2) > 0
    assert {p: cl.k_chunk for p, cl in mods.items()} == before


def test_spec_decoding_lossless_with_compensated_target():
    from specq.engine import SpecEngine
    from specq.generate import generate
    from specq.sampling import SamplingParams
    from specq.spec.draft_model import DraftModelProposer
    from specq.spec.ngram import NgramProposer
    fp = tiny(layers=2)
    q, fpw = quantized(fp)
    compensate_model(q, fpw, k_fraction=0.1, selector="approx", calib=torch.randint(0, 97, (2, 32)))
    draft = tiny(seed=1, layers=1)
    prompt = [5, 17, 3, 5, 17, 3, 5, 17, 8, 2]
    plain = generate(q, prompt, 16, SamplingParams())
    for prop in (DraftModelProposer(draft, k=4, n_drafts=2), NgramProposer(k=4)):
        out, m = SpecEngine(q, prop, SamplingParams()).generate(prompt, 16)
        assert out == plain
    # and verification of the greedy chain in one forward equals step-by-step logits
    ids = torch.tensor(prompt + plain[:-1])
    L = len(prompt)
    q.setup_cache(64)
    with torch.inference_mode():
        pos = torch.arange(ids.numel())
        full = q(ids, pos, pos, causal_mask(0, ids.numel(), 64), return_hidden=False)
        q.setup_cache(64)
        q(ids[:L], pos[:L], pos[:L], causal_mask(0, L, 64), return_hidden=False)
        steps = [q(ids[i:i + 1], pos[i:i + 1], pos[i:i + 1], causal_mask(i, 1, 64), return_hidden=False)[0]
                 for i in range(L, ids.numel())]
    assert torch.allclose(full[L:], torch.stack(steps), atol=1e-4)


def test_parse_spec_and_errors():
    assert parse_spec("k=0.01") == {"selector": "approx", "k_fraction": 0.01}
    assert parse_spec("budget=5%") == {"selector": "approx", "budget": 0.05}
    assert parse_spec("budget=5%,scope=linear") == {"selector": "approx", "budget": 0.05, "scope": "linear"}
    assert parse_spec("k=1%,selector=exact") == {"selector": "exact", "k_fraction": 0.01}
    assert parse_spec("off") == {} and parse_spec(None) == {}
    for bad in ("k=2", "k=abc", "budget=5%,k=0.1", "selector=exact", "x=1", "k", "budget=5%,scope=step",
                "k=0.01,scope=layer"):
        with pytest.raises(SpecqError):
            parse_spec(bad)
    fp = tiny()
    with pytest.raises(SpecqError):
        compensate_model(copy.deepcopy(fp), fp, k_fraction=0.1)              # nothing quantized
    q, fpw = quantized(fp)
    with pytest.raises(SpecqError):
        compensate_model(q, fpw, k_fraction=0.1, selector="approx")          # no calibration
    with pytest.raises(SpecqError):
        apply_compensation(q, "k=0.1", fp=None)
    chosen = apply_compensation(q, "k=0.1,selector=exact", fp=fpw, log=None)
    assert chosen["down_proj"] == pytest.approx(13 / 128)


def _interpreted(code: str):
    """Run `code` under TRITON_INTERPRET=1 (CPU) in a subprocess; it must print ok."""
    from tests.triton_interp import run_interpreted
    out = run_interpreted(code)
    assert "ok" in out and "\nexit " not in out, out


def test_triton_kernels_interpreted():
    """The select and fetch kernels (Triton interpreter on CPU) match the torch reference."""
    pytest.importorskip("triton")
    _interpreted(
        "import torch, torch.nn as nn\n"
        "from specq.compensate import kernel as KK, select as SEL, CompensatedLinear, Residual\n"
        "from specq.quant.wq import WQLinear\n"
        "torch.manual_seed(0); K, N = 2048, 48\n"
        "lin = nn.Linear(K, N); wq = WQLinear.from_linear(lin, 3, 64)\n"
        "res = Residual.from_weights(lin.weight.data, wq.dequantize())\n"
        "ch = torch.exp(torch.randn(K))\n"
        "cl = CompensatedLinear(wq, res, k_chunk=5, selector='approx', stats=SEL.calib_stats(torch.randn(256, K) * ch))\n"
        "x = torch.randn(3, K) * ch\n"
        "for kc in (1, 40, 5):\n"             # boundary bucket at the top, deep, and in between
        "    cl.set_k(kc); idx, xs = KK.select(cl, x); ref = SEL.approx_topk(x, cl.thr, kc)\n"
        "    assert torch.equal(idx.long(), ref), (kc, idx, ref)\n"
        "r = KK.fetch(res, idx, xs)\n"
        "assert torch.allclose(r, cl.correction(x, ref), atol=1e-5), (r - cl.correction(x, ref)).abs().max()\n"
        "print('ok')\n")


def test_fused_partial_interpreted():
    """Fused compensation (no add kernel): the W4A16 GEMV's split-K partials plus the fetch's partial, summed by
    whichever arrives last, equal base + reference correction; tile counters end at zero (Triton interpreter)."""
    pytest.importorskip("triton")
    _interpreted(
        "import torch, torch.nn as nn\n"
        "from specq.compensate import kernel as KK, select as SEL, CompensatedLinear, Residual\n"
        "from specq.kernels.w4a16 import prepare_w4a16, w4a16_linear, w4a16_fused\n"
        "from specq.quant.wq import WQLinear\n"
        "torch.manual_seed(0); K, N = 512, 192\n"
        "lin = nn.Linear(K, N, bias=False); wq = WQLinear.from_linear(lin, 4, 128)\n"
        "res = Residual.from_weights(lin.weight.data, wq.dequantize())\n"
        "ch = torch.exp(torch.randn(K))\n"
        "cl = CompensatedLinear(wq, res, k_chunk=7, selector='approx', stats=SEL.calib_stats(torch.randn(256, K) * ch))\n"
        "w = prepare_w4a16(wq.qweight, wq.scales, wq.zeros, 128, torch.bfloat16)\n"
        "def want(x):\n"
        "    return w4a16_linear(x, w).float() + cl.correction(x.float(), SEL.approx_topk(x.float(), cl.thr, 7))\n"
        "for M, cfg in ((1, None), (3, None), (20, (16, 64, 2, 1, 4, 1))):\n"
        "    x = (torch.randn(M, K) * ch).to(torch.bfloat16)\n"
        "    if cfg is None:\n"
        "        y = KK.fused(cl, x, w)\n"
        "    else:\n"
        "        y = w4a16_fused(x, w, lambda t: KK.fetch_partial(res, *KK.select(cl, x), t), cfg=cfg)\n"
        "    r = want(x)\n"
        "    err = ((y.float() - r).norm() / r.norm()).item()\n"
        "    assert err < 1e-2 and int(w.locks.abs().sum()) == 0, (M, err)\n"
        "    base_err = ((w4a16_linear(x, w).float() - r).norm() / r.norm()).item()\n"
        "    assert base_err > 5 * err, (M, base_err, err)\n"   # the correction is really in y
        "print('ok')\n")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_reference():
    lin, wq = qlayer(K=2048, N=256, bits=4, gs=128)
    res = Residual.from_weights(lin.weight.data, wq.dequantize())
    assert res.codes.is_pinned()
    stats = SEL.calib_stats(heavy(256, 2048))
    for sel in ("approx", "exact"):
        cl = CompensatedLinear(wq, res, k_chunk=6, selector=sel, stats=stats)
        x = heavy(5, 2048, torch.Generator().manual_seed(2))
        y_cpu = cl(x)
        cl.cuda()
        assert res.codes.device.type == "cpu"              # the residual never moves to the GPU
        y = cl(x.cuda()).cpu()
        assert torch.allclose(y, y_cpu, atol=1e-3, rtol=1e-3), (y - y_cpu).abs().max()
        single = torch.cat([cl(x[i:i + 1].cuda()).cpu() for i in range(5)])
        assert torch.allclose(single, y, atol=1e-4)
        cl.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_path_perm_bias():
    """The fused path (no add kernel) equals the side stream + add path for a 4-bit g128 layer with a column
    permutation (act-order) and a bias, at M = 1 and a verification-sized M = 7, and leaves its locks at zero."""
    from specq.quant import pack as P
    torch.manual_seed(3)
    K, N = 1024, 384
    lin = nn.Linear(K, N, bias=True)
    perm = torch.randperm(K)
    q, s, z = P.rtn(lin.weight.data[:, perm], 4, 128, True, None)
    wq = WQLinear.from_codes(q, s, z, 4, 128, True, lin.bias.data, torch.bfloat16, perm=perm)
    res = Residual.from_weights(lin.weight.data, wq.dequantize().float())
    cl = CompensatedLinear(wq, res, k_chunk=9, selector="approx", stats=SEL.calib_stats(heavy(256, K))).cuda()
    for M in (1, 7):
        x = heavy(M, K, torch.Generator().manual_seed(M)).cuda().to(torch.bfloat16)
        cl.use_fused = False
        side = cl(x).float()
        cl.use_fused = True
        fused = cl(x).float()
        assert cl.base.w4a16_for(torch.bfloat16) is not None
        assert int(cl.base._w4a16.locks.abs().sum()) == 0
        xc = x.float().cpu()
        ref = cl.base(x).float() + cl.correction(xc, cl.select(xc)).cuda()
        assert ((fused - ref).norm() / ref.norm()) < 1e-2, M
        assert ((fused - side).norm() / side.norm()) < 1e-2, M


@torch.no_grad()
def test_compiled_decoder_runs_compensated_linears_as_one_opaque_op(monkeypatch):
    """Under torch.compile a CompensatedLinear is one opaque op (as the quantized Linears are: its CUDA paths launch
    kernels through ctypes, which dynamo cannot trace) that runs its eager matmul2d; greedy tokens equal eager."""
    import torch._dynamo
    from specq.bench.randmodel import build_random, config
    from specq.compensate.linear import CompensatedLinear, compensate_model
    from specq.generate import Decoder
    from specq.quant import opaque
    from specq.quant.wq import WQLinear
    monkeypatch.setattr(opaque, "FORCE", True)              # CPU tensors through the opaque op as on CUDA
    torch.manual_seed(0)
    model = build_random(config("tiny", num_layers=2), "w4a16", "cpu", torch.float32)
    fp = {m: m.dequantize().float() + 0.05 * torch.randn(m.out_features, m.in_features)
          for m in model.modules() if isinstance(m, WQLinear)}
    compensate_model(model, fp, k_fraction=0.05, selector="exact")
    calls = []
    orig = CompensatedLinear.matmul2d
    monkeypatch.setattr(CompensatedLinear, "matmul2d", lambda self, x2: calls.append(torch.compiler.is_compiling())
                        or orig(self, x2))
    ids = torch.tensor([5, 7, 11])
    toks = {}
    for comp in (False, True):
        torch._dynamo.reset()
        calls.clear()
        dec = Decoder(model, 12, cuda_graph=False, compile=comp)
        t = int(dec.prefill(ids).argmax())
        out = [t]
        for _ in range(4):
            t = int(dec.step(t).argmax())
            out.append(t)
        toks[comp] = out
        assert calls and not any(calls)                      # run eagerly, never traced into
    torch._dynamo.reset()
    assert toks[True] == toks[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuner_times_graph_replays_on_cuda():
    """On the GPU the tuner times a Linear per call of a CUDA graph of back-to-back calls, as decoding runs it: well
    below an eager call's time (the host's launch gaps), and the module's k is left as it was."""
    from specq.compensate import tune as T
    from specq.quant import pack as P
    torch.manual_seed(4)
    K, N = 2048, 1024
    lin = nn.Linear(K, N, bias=False)
    q, s, z = P.rtn(lin.weight.data, 4, 128, True, None)
    wq = WQLinear.from_codes(q, s, z, 4, 128, True, None, torch.bfloat16)
    res = Residual.from_weights(lin.weight.data, wq.dequantize().float())
    cl = CompensatedLinear(wq, res, k_chunk=3, selector="approx", stats=SEL.calib_stats(heavy(256, K))).cuda()
    t_graph = T.measure_layer(cl, 4)
    assert cl.k_chunk == 3
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    cl.set_k(4)
    with torch.inference_mode():
        t_eager = T._time_fn(lambda: cl(x), x.device, 20)
    assert 0 < t_graph < t_eager, (t_graph, t_eager)
