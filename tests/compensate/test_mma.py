"""One-token compensation on w4mma (specq.compensate.mma): the reference of qdec1's partials, the routing, and the
CUDA sources (compiled for sm_90 where nvcc is installed). The kernels run on the GPU only (bench/qdec_overhead.py
check_mma compares them with these references)."""
import shutil
import subprocess

import pytest
import torch

from specq.compensate import mma
from specq.compensate import select as SEL
from specq.compensate.linear import CompensatedLinear
from specq.compensate.residual import Residual
from specq.kernels import w4mma


def _layer(K=2048, N=256, kc=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    res = Residual.from_weights(W, W + 0.01 * torch.randn(N, K, generator=g))
    x = torch.randn(64, K, generator=g) * torch.exp(torch.randn(K, generator=g))
    base = torch.nn.Linear(K, N, bias=False)
    return CompensatedLinear(base, res, k_chunk=kc, selector="approx", stats=SEL.calib_stats(x)), x, res


@pytest.mark.parametrize("kc", [1, 5, 20])
def test_partials_sum_to_the_reference_correction(kc):
    """scale * sum over chunks of partials_ref == CompensatedLinear.correction (the math w4mma's QD epilogue does)."""
    cl, x, res = _layer(kc=kc)
    for i in range(3):
        x1 = x[i:i + 1]
        ws = mma.partials_ref(cl, x1)                                        # [n, N]
        assert ws.shape == (cl.n_chunks, res.N)
        ref = cl.correction(x1, cl.select(x1))[0]
        assert torch.allclose(ws.sum(0) * res.scales, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_partials_ref_changes_with_the_selection():
    """A different salient set gives different partials (the GPU check relies on this to catch a wrong selection)."""
    cl, x, _ = _layer()
    a = mma.partials_ref(cl, x[:1])
    cl.set_k(6)
    b = mma.partials_ref(cl, x[:1])
    assert not torch.allclose(a, b)


def _qdec1_select(xc: torch.Tensor, th: torch.Tensor, KC: int, threads: int = mma.THREADS) -> list[int]:
    """qdec1's selection of one chunk, step by step as the kernel does it (thread t holds channels t*CPT ..): buckets,
    a histogram without the bottom bucket (its count stands at KC), the boundary bucket, one exclusive scan of the
    packed counts (above << 16 | in the boundary bucket), then each thread's slots. -> channel ids by slot."""
    C, NB = xc.numel(), th.numel()
    cpt = -(-C // threads)
    bk = [NB + 1] * (cpt * threads)
    hist = [0] * 64
    hist[NB] = KC
    for i in range(C):
        a = abs(float(xc[i]))
        bk[i] = sum(not (a >= float(q)) for q in th)                         # a < th[q], NaN-safe as in CUDA
        if bk[i] < NB:
            hist[bk[i]] += 1
    cum, bstar = 0, 0
    for b in range(NB + 1):
        cum += hist[b]
        if cum >= KC:
            break
        bstar, above = b + 1, cum
    need = KC - (above if bstar else 0)
    packed = [sum((bk[t * cpt + j] < bstar) << 16 | (bk[t * cpt + j] == bstar) for j in range(cpt))
              for t in range(threads)]
    slots = [None] * KC
    pre = 0
    for t in range(threads):
        ar, ir = pre >> 16, pre & 0xFFFF
        for j in range(cpt):
            i = t * cpt + j
            if bk[i] < bstar:
                slots[ar + min(ir, need)] = i
                ar += 1
            elif bk[i] == bstar:
                if ir < need:
                    slots[ar + ir] = i
                ir += 1
        pre += packed[t]
    return slots


@pytest.mark.parametrize("C,KC,NB", [(1024, 5, 32), (1024, 20, 32), (576, 3, 32), (1024, 5, 8)])
def test_qdec1_selection_steps_equal_approx_topk(C, KC, NB):
    """The kernel's selection steps give approx_topk's set, in channel order: for typical tokens, for tokens far
    below the calibration (boundary = bottom bucket), far above it (boundary = top bucket) and with ties."""
    g = torch.Generator().manual_seed(C + KC + NB)
    scale = torch.exp(torch.randn(C, generator=g))
    stats = SEL.calib_stats(torch.randn(64, C, generator=g) * scale)
    th = SEL.thresholds(stats, KC, NB)[0]
    cases = [torch.randn(C, generator=g) * scale for _ in range(4)]
    cases += [torch.randn(C, generator=g) * scale * 1e-3, torch.randn(C, generator=g) * scale * 1e3,
              torch.randint(0, 3, (C,), generator=g).float() * float(th[NB // 2])]
    for xc in cases:
        ref = SEL.approx_topk(xc[None], th[None], KC)[0].tolist()
        assert _qdec1_select(xc, th, KC) == ref


def test_not_usable_off_cuda_or_for_exact_selection():
    cl, x, _ = _layer()
    assert not mma.usable(cl, x[:1], object())                              # CPU tensor
    cl.selector = "exact"
    assert not mma.usable(cl, x[:1], object())


def test_three_bit_base_routes_one_token_through_qdec1_partials(monkeypatch):
    """The routing of a 3-bit WQLinear base at one token (specq.compensate.mma.linear_w3), run on CPU with qdec1
    replaced by its torch reference: the output equals base + reference correction (rounded once), several-token
    inputs and the exact selector keep the reference path, and without the route the result is the same math."""
    from specq.kernels import w3a16 as K3
    cl, base, x = _wq_layer(3, seed=3)
    w3 = K3.prepare_w3a16(base.qweight, base.scales, base.zeros, 128, base.in_features, torch.float32)
    calls = []
    monkeypatch.setattr(mma, "usable_qdec1", lambda c, x2: x2.shape[0] == 1 and c.selector == "approx")
    monkeypatch.setattr(base, "w3a16_for", lambda dtype: w3, raising=False)

    def fake_partials(c, x2, fp16, beside_w4mma=True, after=False):
        calls.append((beside_w4mma, after))
        return mma.partials_ref(c, x2)
    monkeypatch.setattr(mma, "partials", fake_partials)
    x1 = x[:1]
    y = cl._fused(x1)                                        # what forward() calls first on CUDA
    assert calls == [(False, True)]      # qdec1's default shape (no w4mma grid beside it), launched after the GEMV
    ref = cl(x1)                                             # CPU forward: the reference math
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert not torch.allclose(y, base(x1), rtol=1e-3, atol=1e-3)     # the correction is there
    assert cl._fused(x[:4]) is None                          # several tokens: the side path
    cl.selector = "exact"
    assert cl._fused(x1) is None
    assert calls == [(False, True)]


def test_four_bit_base_still_reaches_the_w4a16_route(monkeypatch):
    """A 4-bit WQLinear also has w3a16_for (None there): the one-token route must go on to its W4A16 weight (the
    session-15 bug: it returned at the 3-bit check, so decoding fell back to the side stream)."""
    cl, base, x = _wq_layer(4, seed=4)
    asked = []
    monkeypatch.setattr(mma, "usable_qdec1", lambda c, x2: True)
    monkeypatch.setattr(base, "w4a16_for", lambda dtype: asked.append(dtype), raising=False)
    assert base.w3a16_for(torch.float32) is None
    assert cl._fused(x[:1]) is None and asked == [torch.float32]


def _wq_layer(bits, seed, K=2048, N=256):
    """A CompensatedLinear (approx selector, k_chunk 5) on a `bits`-bit WQLinear (RTN, group 128) of a random weight
    whose residual is exact up to its 4-bit quantization -> (layer, base, activations [64, K])."""
    from specq.quant.wq import WQLinear
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data.copy_(W)
    base = WQLinear.from_linear(lin, bits=bits, group_size=128)
    x = torch.randn(64, K, generator=g) * torch.exp(torch.randn(K, generator=g))
    cl = CompensatedLinear(base, Residual.from_weights(W, base.dequantize().float()), k_chunk=5, selector="approx",
                           stats=SEL.calib_stats(x))
    return cl, base, x


def test_w4mma_qd_epilogues_wait_where_they_should():
    """QD 1: no wait before the loads, one in the epilogue before the partials are read; QD 2: only the second half of
    the tiles waits, the first half stores fp32 sums first; QD 0 keeps the wait first (programmatic dependent launch)."""
    for qd in (1, 2):
        src = w4mma.source(1, 8, 8, 16, False, 2, pdl=True, qd=qd)
        body = src[src.index("w4mma(const uint4*"):]
        assert "#define QD %d" % qd in src
        first_wait = body.index('asm volatile("griddepcontrol.wait;"')
        assert body.index("#if PDL && (!QD || QI)") < first_wait              # the start-of-kernel wait is off (QI 0)
        if qd == 2:
            assert body.index("if (qearly)") < body.index("qg[row] = s") < body.index("continue;")
            epi = body.index("#if QD == 2  // many waves")
            assert epi < body.index("if (!qearly) asm volatile(\"griddepcontrol.wait;\"") < body.index("qg[row] = s")
    src0 = w4mma.source(1, 8, 8, 16, False, 2, pdl=True)
    assert "#define QD 0" in src0


def test_qd2_every_early_tile_is_finished_once_by_a_later_tile():
    """QD 2 (many-wave grids), as the epilogue indexes: tiles [0, E) only store sums, E = T - ceil(T / (QR + 1)); tile
    E + i finishes itself and early tiles QR i .. QR i + QR - 1. Every tile is finished exactly once, by itself or by
    a tile of a higher index (dispatched later, so an early one never waits on it)."""
    for T in (1, 2, 7, 1792, 1793, 3584):
        for QR in (1, 2, 4, 9):
            E = T - (T + QR) // (QR + 1)
            done = {}
            for tile in range(E, T):
                done.setdefault(tile, []).append(tile)
                for j in range(16 * QR):                                     # the epilogue's row loop
                    e = (tile - E) * QR + (j >> 4)
                    if e < E and j & 15 == 0:
                        done.setdefault(e, []).append(tile)
            assert sorted(done) == list(range(T)), (T, QR)
            assert all(len(v) == 1 and v[0] >= k for k, v in done.items())
    src = w4mma.source(1, 8, 4, 8, False, 3, pdl=True, qd=2, qr=4)
    assert "#define QR 4" in src and "NTL - (NTL + QR) / (QR + 1)" in src and "#define NTL gridDim.x" in src


@pytest.mark.parametrize("sms", [132, 114])
def test_qdec1_launch_shape_fits_beside_one_wave_grids(sms):
    """Beside a one-wave w4mma grid qdec1 takes no more CTAs than the slots that grid leaves (Llama-3-8B shapes);
    down_proj (14 chunks) needs chunks shared by CTAs; many-wave gate_up keeps the default shape."""
    for K, N in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        n, W = -(-K // 1024), N // 8
        th, wpt, ch = mma.launch_shape(N, K, n, W, sms)
        c = w4mma.default_config(1, N, K, sms)
        spare = c.MINB * sms - N // 16
        ctas = -(-n // ch) * -(-W // (th * wpt))
        assert th <= c.WARPS * 32 and th * wpt * -(-W // (th * wpt)) >= W
        if 0 <= spare and (N, K) != (28672, 4096):
            assert ctas <= spare or (th, wpt, ch) == (mma.THREADS, 1, 1)
        else:
            assert (th, wpt, ch) == (mma.THREADS, mma.WPT_WIDE if W >= mma.WIDE_W else 1, 1)
    assert mma.launch_shape(4096, 14336, 14, 512, 132) == (512, 1, 2)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("C,KC,fp16,pdl,wpt,th,ch,after", [
    (1024, 5, False, True, 2, 256, 1, False), (576, 20, True, False, 1, 256, 1, False),
    (1024, 32, False, True, 1, 256, 1, False), (1024, 5, False, True, 1, 512, 2, False),
    (1024, 5, False, True, 2, 256, 1, True)])
def test_qdec1_compiles_for_sm90(tmp_path, C, KC, fp16, pdl, wpt, th, ch, after):
    f = tmp_path / "qdec1.cu"
    src = mma.source(C, KC, 32, fp16, pdl, wpt, th, ch, after)
    f.write_text(src)
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-o", str(f.with_suffix(".cubin")), str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    if pdl:                                                # preprocessed: where the kernel waits
        pre = subprocess.run(["nvcc", "-E", "-x", "cu", str(f)], capture_output=True, text=True).stdout
        body = pre[pre.index("qdec1_cta(const u16*"):]
        i_sel, i_wait = body.index("select_chunk("), body.index("griddepcontrol.wait")
        assert body.count("griddepcontrol.wait") == 1
        assert (i_wait > i_sel) == after                   # AFTER: at the end, past the selection and the fetch


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("qd,res,qn", [(1, False, 0), (2, True, 0), (1, False, 4), (1, False, 14), (2, False, 4)])
def test_w4mma_qd_compiles_for_sm90(tmp_path, qd, res, qn):
    """QD 1 / 2 epilogues, and with the compensation CTAs in the grid (QI: qn chunks): compiled for sm_90."""
    qi = (12, 3, qn, mma.defines(1024, 5, 32, None, 1, 256, 1, False), mma._SRC) if qn else None
    f = tmp_path / "w4mma.cu"
    f.write_text(w4mma.source(1, 8, 4, 8, False, 3, False, 2, False, False, False, res, 0.0, True, qd, 4, qi))
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "--resource-usage", "-o", str(f.with_suffix(".cubin")),
                        str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ingrid_epilogue_rows_are_the_prefetched_rows():
    """QI prefetch: thread t owns (t & 13 == 0, t < 128) row (t >> 4) + 8 ((t & 3) >> 1) of its tile - exactly the
    rows the epilogue loop gives token 0 (n = i >> 7, l = (i >> 2) & 31, r = i & 3), each once."""
    own = {t: (t >> 4) + 8 * ((t & 3) >> 1) for t in range(512) if t < 128 and t & 13 == 0}
    epi = {}
    for i in range(128):                             # NT = 1: NT * 128 items, thread i takes item i
        n, l, r = i >> 7, (i >> 2) & 31, i & 3
        if 8 * n + 2 * (l & 3) + (r & 1) == 0:
            epi[i] = (l >> 2) + 8 * (r >> 1)
    assert own == epi and sorted(own.values()) == list(range(16))


@pytest.mark.parametrize("sms", [132, 114])
def test_ingrid_shape_fits_one_wave_grids(sms):
    """In-grid compensation CTAs beside a one-wave w4mma grid use no more than its spare slots, cover every word and
    chunk, and keep WPT * CH * KC within MAX_QREGS; they take as many threads as a w4mma CTA."""
    for (K, N) in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]:
        n, W = K // 1024, N // 8
        c = w4mma.default_config(1, N, K, sms)
        for KC in (3, 5, 20, 32):
            sh = mma.ingrid_shape(N, K, n, W, sms, KC)
            T, slots = N // 16, c.MINB * sms
            if sh is None:
                assert KC > 5 or T <= slots                     # only large KC or a full one-wave grid go without
                continue
            th, wpt, ch = sh
            qc = -(-n // ch) * -(-W // (th * wpt))
            assert th == c.WARPS * 32 and th * wpt * -(-W // (th * wpt)) >= W and wpt * ch * KC <= mma.MAX_QREGS
            if T <= slots:
                assert qc <= slots - T
    assert mma.ingrid_shape(4096, 14336, 14, 512, 132, 5) == (512, 1, 2)       # Llama-3-8B down_proj: 7 CTAs


def _cuobjdump():
    try:
        import os
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return p if os.path.exists(p) else shutil.which("cuobjdump")
    except Exception:  # noqa: BLE001 - no triton: look on PATH
        return shutil.which("cuobjdump")


def _sass_ops(tmp_path, src: str) -> list[str]:
    f = tmp_path / "k.cu"
    f.write_text(src)
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-o", str(f.with_suffix(".cubin")), str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = subprocess.run([_cuobjdump(), "-sass", str(f.with_suffix(".cubin"))], capture_output=True, text=True).stdout
    ops = []
    for line in out.splitlines():
        parts = line.split("*/")
        if len(parts) < 2 or not parts[1].strip():
            continue
        toks = parts[1].strip().split()
        op = toks[1] if toks[0].startswith("@") and len(toks) > 1 else toks[0]
        ops.append(op.rstrip(";"))
    return ops


@pytest.mark.skipif(shutil.which("nvcc") is None or _cuobjdump() is None, reason="nvcc / cuobjdump not installed")
def test_sass_wait_positions(tmp_path):
    """In the machine code: plain PDL w4mma waits (ACQBULK) before its first global load; the QD variant waits only
    after its MMAs (epilogue), and every load after that wait is a coherent one (not .CONSTANT); qdec1 reads only its
    thresholds (constants) before its wait, x after it."""
    ops = _sass_ops(tmp_path, w4mma.source(1, 8, 4, 8, False, 3, False, 2, False, False, False, True, 0.0, True, 0))
    assert ops.index("ACQBULK") < min(i for i, o in enumerate(ops) if o.startswith("LDG"))
    ops = _sass_ops(tmp_path, w4mma.source(1, 8, 4, 8, False, 3, False, 2, False, False, False, False, 0.0, True, 1))
    wait = ops.index("ACQBULK")
    assert max(i for i, o in enumerate(ops) if o.startswith("HMMA")) < wait
    assert any(o == "LDG.E" for o in ops[wait:])                              # the partials, coherent
    ops = _sass_ops(tmp_path, mma.source(1024, 5, 32, False, True, 2))
    wait = ops.index("ACQBULK")
    assert {o for o in ops[:wait] if o.startswith("LDG")} == {"LDG.E.CONSTANT"}          # the thresholds
    assert wait < min(i for i, o in enumerate(ops) if o.startswith("LDG.E.U16"))          # x


def test_w4mma_rejects_bad_compensation_before_launching():
    """Compensation partials take one token and float32 [n, N], without the fused norm: anything else is a SpecqError
    (checked before any kernel is compiled or launched, so this runs on the CPU)."""
    from specq.errors import SpecqError
    from specq.kernels import ref
    N, K = 32, 256
    w = w4mma.prepare_mma(*ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cpu", torch.Generator().manual_seed(0)),
                          128, torch.bfloat16)
    ws, sc = torch.zeros(2, N), torch.ones(N)
    x1, x2 = torch.randn(1, K, dtype=torch.bfloat16), torch.randn(2, K, dtype=torch.bfloat16)
    with pytest.raises(SpecqError, match="one token"):
        w4mma.w4mma_linear(x2, w, comp=(ws, sc, 2))                           # two tokens
    with pytest.raises(SpecqError, match="one token"):
        w4mma.w4mma_linear(x1, w, comp=(ws.half(), sc, 2))                    # not float32
    with pytest.raises(SpecqError, match="one token"):
        w4mma.w4mma_linear(x1, w, comp=(torch.zeros(2, N + 8), sc, 2))         # wrong width
    with pytest.raises(SpecqError, match="one token"):
        w4mma.w4mma_linear(x1, w, norm_w=torch.ones(K, dtype=torch.bfloat16), eps=1e-5, comp=(ws, sc, 2))
    qi = (1, 1, 2, mma.defines(1024, 5, 32, None, 1, 256, 1, False), mma._SRC, sc, sc)
    with pytest.raises(SpecqError, match="in-grid"):
        w4mma.w4mma_linear(x1, w, comp=(ws, sc, 2, qi[:6]))                   # incomplete launch description
    with pytest.raises(SpecqError, match="in-grid"):
        w4mma.w4mma_linear(x1, w, comp=(ws, sc, 2, qi[:2] + (3,) + qi[3:]))   # for another number of chunks
