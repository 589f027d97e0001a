"""The wgmma W4A16 kernel (specq.kernels.w4wg): its shared-memory x layout against the words' k permutation, the
config rule, and the CUDA source (compiled for sm_90a where nvcc is installed). The kernel itself runs on the GPU
only (bench/dev/wg_ab.py checks it against the reference before timing)."""
import shutil
import subprocess

import pytest
import torch

from specq.errors import SpecqError
from specq.kernels import w4mma, w4wg
from specq.kernels.ref import unpack_int4


def _a_fragments(words: torch.Tensor, tile: int, b: int, j: int) -> torch.Tensor:
    """A [16 rows, 16 kappa] that warp lanes hold for k16 step j of block b (mma A fragment layout: register i of
    lane (g, t) is (row g + 8 (i % 2), kappa 2 t + 8 (i // 2) + e)), decoded from the words as the kernel does."""
    A = torch.empty(16, 16, dtype=torch.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        word = int(words[tile, b, lane, j]) & 0xFFFFFFFF
        for i in range(4):
            for e in range(2):
                A[g + 8 * (i % 2), 2 * t + 8 * (i // 2) + e] = (word >> (4 * i + 16 * e)) & 0xF
    return A


@pytest.mark.parametrize("ntok", [16, 32])
def test_stage_layout_pairs_words_with_x(ntok):
    """sum over blocks and k16 steps of A_j @ B_j (A from the repack_wg words, B read through the swizzled descriptor
    from a stage written by STAGE's map) equals q @ x^T: the words pair each A register with the right x element."""
    g = torch.Generator().manual_seed(0)
    N, K = 32, 128
    q = torch.randint(0, 16, (N, K), generator=g)
    packed = (q.view(N, K // 8, 8) << (4 * torch.arange(8))).sum(-1)
    qweight = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    assert torch.equal(unpack_int4(qweight).long(), q)
    words = w4wg.repack_wg(qweight)
    x = torch.randint(-8, 8, (ntok, K), generator=g)
    smap = w4wg.stage_map(ntok)
    out = torch.zeros(N, ntok, dtype=torch.int64)
    for b in range(K // 64):
        stage = x[:, 64 * b:64 * b + 64].reshape(-1)[smap]                  # the stage's bf16 slots
        for j in range(4):
            B = w4wg.wgmma_b(stage, j, ntok)                                 # [16 kappa, ntok]
            for tile in range(N // 16):
                out[16 * tile:16 * tile + 16] += _a_fragments(words, tile, b, j) @ B
    assert torch.equal(out, q @ x.T)


def test_the_w4mma_words_would_not_pair():
    """The check can fail: w4mma's words (k permuted inside a block) against the natural-order stage give another
    product."""
    g = torch.Generator().manual_seed(1)
    N, K, ntok = 16, 64, 16
    q = torch.randint(0, 16, (N, K), generator=g)
    packed = (q.view(N, K // 8, 8) << (4 * torch.arange(8))).sum(-1)
    qweight = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    words = w4mma.repack_mma(qweight)
    x = torch.randint(-8, 8, (ntok, K), generator=g)
    stage = x.reshape(-1)[w4wg.stage_map(ntok)]
    out = sum(_a_fragments(words, 0, 0, j) @ w4wg.wgmma_b(stage, j, ntok) for j in range(4))
    assert not torch.equal(out, q @ x.T)


def test_stage_map_writes_every_slot_once():
    m = w4wg.stage_map(64)
    assert torch.equal(m.sort().values, torch.arange(64 * 64))


def test_a_wrong_swizzle_is_caught():
    """The layout check can fail: reading the stage without the XOR swizzle gives another product."""
    ntok = 16
    x = torch.arange(ntok * 64).view(ntok, 64)
    stage = x.reshape(-1)[w4wg.stage_map(ntok)]
    plain = stage.view(ntok, 64)[:, :16].T                                    # unswizzled read of step 0
    assert not torch.equal(plain, w4wg.wgmma_b(stage, 0, ntok))


def test_resolve_splits_k_into_whole_groups():
    c, kbw = w4wg.resolve(w4wg.WgCfg(TARGET=264), 64, 6144, 4096)           # 48 CTAs of 128 rows
    assert c.SPLIT * 48 >= 0.9 * 264 and kbw * c.SPLIT == 64 and kbw % 4 == 0
    c, kbw = w4wg.resolve(w4wg.WgCfg(TARGET=264), 64, 28672, 4096)
    assert c.SPLIT == 2 and kbw == 32
    c, kbw = w4wg.resolve(w4wg.WgCfg(TARGET=132), 64, 28672, 4096)        # 224 CTAs: no split
    assert c.SPLIT == 1 and kbw == 64
    c, kbw = w4wg.resolve(w4wg.WgCfg(SPLIT=7), 64, 4096, 14336)
    assert kbw == 32
    with pytest.raises(SpecqError):
        w4wg.resolve(w4wg.WgCfg(SPLIT=3), 64, 4096, 4096)                   # 64 blocks do not split 3 ways
    # a cluster reduction only for 2..8 CTAs over K (the portable cluster size); otherwise global partials
    assert w4wg.resolve(w4wg.WgCfg(SPLIT=8, CL=1), 64, 4096, 4096)[0].CL == 1
    assert w4wg.resolve(w4wg.WgCfg(SPLIT=1, CL=1), 64, 4096, 4096)[0].CL == 0
    assert w4wg.resolve(w4wg.WgCfg(SPLIT=16, CL=1), 64, 4096, 14336)[0].CL == 0
    with pytest.raises(SpecqError):
        w4wg.resolve(w4wg.WgCfg(), 65, 4096, 4096)
    with pytest.raises(SpecqError):
        w4wg.resolve(w4wg.WgCfg(), 32, 4096 + 64, 4096)                     # 128 rows per CTA
    assert w4wg.token_tile(17) == 32 and w4wg.token_tile(64) == 64 and w4wg.token_tile(3) == 16


@pytest.mark.parametrize("ntok,cfg", [(64, w4wg.WgCfg()), (32, w4wg.WgCfg(WG=1, RT=2, MINB=1, DB=0)),
                                      (48, w4wg.WgCfg(P=8)), (64, w4wg.default_config(64, 28672, 4096)),
                                      (64, w4wg.default_config(64, 6144, 4096)), (32, w4wg.WgCfg(S=3, KS=4))])
def test_source_compiles_for_sm90a(tmp_path, ntok, cfg):
    """Complete CUDA C; with nvcc present it compiles for sm_90a without spills and without ptxas serializing the
    wgmma pipeline (which it does, with a warning, when it cannot prove the A registers are not overwritten)."""
    c, kbw = w4wg.resolve(cfg, ntok, 6144, 4096)
    src = w4wg.source(c, ntok, kbw, False, K=4096)
    assert f"m64n{ntok}k16.f32.bf16.bf16" in src and "WGMMA_FN" not in src
    assert f"#define CL {c.CL}" in src
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: source checked only")
    f = tmp_path / "wg.cu"
    f.write_text(src)
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90a", "--resource-usage", "-o", str(f.with_suffix(".cubin")),
                        str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "0 bytes spill stores" in r.stdout + r.stderr
    assert "serialized" not in r.stdout + r.stderr


def test_config_rule_by_shape():
    """Wide N and long K: two 64-row blocks per warpgroup (K split only for long K); qkv / o: one block, 4 per SM,
    the K split reduced inside a cluster, 3 x stages over 32 tokens."""
    wide, longk, small = (w4wg.default_config(64, 28672, 4096), w4wg.default_config(64, 4096, 14336),
                          w4wg.default_config(64, 6144, 4096))
    assert (wide.RT, wide.TARGET) == (2, 132) and (longk.RT, longk.TARGET) == (2, 264)
    assert (small.RT, small.MINB, small.CL, small.S) == (1, 4, 1, 3)
    assert w4wg.default_config(32, 6144, 4096).S == 4
    rs = w4wg.resolve(small, 64, 6144, 4096)[0]
    assert rs.SPLIT == 4 and rs.CL == 1                     # 96 row groups x 4: clusters of 4 CTAs
    assert w4wg.resolve(longk, 64, 4096, 14336)[0].CL == 0  # no cluster asked for: global partials
    assert w4wg.resolve(wide, 64, 28672, 4096)[0].SPLIT == 1
    assert w4wg.resolve(longk, 64, 4096, 14336)[0].SPLIT == 8
    with pytest.raises(SpecqError):
        w4wg.default_config(64, 4096 + 16, 4096)


def test_cpu_weights_keep_no_wgmma_layout():
    """The layout is kept only for CUDA weights on sm_90 (a CPU weight: no copy, w4a16_linear takes other paths)."""
    from specq.kernels import ref
    from specq.kernels.w4a16 import prepare_w4a16
    q, s, z = ref.random_w4a16(128, 256, 128, True, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    assert not w4wg.usable(q, 128, 256, 128)
    assert prepare_w4a16(q, s, z, 128).wg is None


def test_prepare_wg_rejects_unsupported_weights():
    from specq.kernels import ref
    q, s, z = ref.random_w4a16(96, 256, 128, True, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(SpecqError):
        w4wg.prepare_wg(q, s, z, 128)                                        # N % 64
    q, s, z = ref.random_w4a16(128, 256, 128, True, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    w = w4wg.prepare_wg(q, s, z, 128)
    assert w.words.shape == (8, 4, 32, 4) and w.sz.shape == (8, 2, 16)


def test_lock_table_does_not_keep_weights_alive():
    """The split-K counters are kept per weight through a weak reference: dropping the weight drops its entry."""
    import gc
    import weakref
    from specq.kernels import ref
    q, s, z = ref.random_w4a16(128, 256, 128, True, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    w = w4wg.prepare_wg(q, s, z, 128)
    locks = w4wg.locks_for(w)
    assert locks.shape == (2,) and int(locks.abs().sum()) == 0
    assert w4wg.locks_for(w) is locks                                       # the same counters on the next call
    alive = weakref.ref(w.words)
    n = len(w4wg._LOCKS)
    del w
    gc.collect()
    assert alive() is None and len(w4wg._LOCKS) == n - 1


def test_w4wg_linear_rejects_bad_inputs_before_any_launch():
    """A wrong K, too many tokens or an unsupported config is one SpecqError, raised before anything reaches a GPU."""
    from specq.kernels import ref
    q, s, z = ref.random_w4a16(128, 256, 128, True, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    w = w4wg.prepare_wg(q, s, z, 128)
    with pytest.raises(SpecqError, match="K=256"):
        w4wg.w4wg_linear(torch.randn(32, 128, dtype=torch.bfloat16), w)
    with pytest.raises(SpecqError, match="M=65"):
        w4wg.w4wg_linear(torch.randn(65, 256, dtype=torch.bfloat16), w)
    with pytest.raises(SpecqError):
        w4wg.w4wg_linear(torch.randn(32, 256, dtype=torch.bfloat16), w, w4wg.WgCfg(WG=4))   # 256 rows per CTA
