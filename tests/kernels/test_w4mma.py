"""The few-token CUDA W4A16 kernel (specq/kernels/w4mma.py): its weight layout and the math it does, on CPU.
The kernel itself needs a GPU (bench/check_kernels.py and bench/dev/mma_ab.py run it against the reference)."""
import pytest
import torch

from specq.errors import SpecqError
from specq.kernels import ref, w4mma
from specq.kernels import w4a16 as W


def test_lane_layout_by_hand():
    """Word j of lane (g, t) in block (tile, b): nibble i of half e = q[16 tile + g + 8 (i % 2), 64 b + 16 t + 4 j +
    2 (i // 2) + e], read here word by word as a lane would, independently of repack_mma's permute."""
    N, K = 32, 256
    q = torch.randint(0, 16, (N, K))
    words = w4mma.repack_mma(ref.pack_int4(q)).to(torch.int64) & 0xFFFFFFFF        # [N/16, K/64, 32, 4]
    for tile, b, lane, j in [(0, 0, 0, 0), (1, 3, 31, 3), (0, 2, 13, 1), (1, 1, 6, 2)]:
        g, t = lane // 4, lane % 4
        word = int(words[tile, b, lane, j])
        for i in range(4):
            for e in range(2):
                nib = (word >> (4 * i + 16 * e)) & 0xF
                assert nib == int(q[16 * tile + g + 8 * (i % 2), 64 * b + 16 * t + 4 * j + 2 * (i // 2) + e])


@pytest.mark.parametrize("G,sym,dtype", [(128, True, torch.bfloat16), (128, False, torch.bfloat16),
                                         (-1, False, torch.bfloat16), (256, True, torch.float16)])
def test_emulated_kernel_equals_reference(G, sym, dtype):
    """emulate() decodes the words and packed scale/zero words the way the lanes do (MAGIC | q, + (-(MAGIC + z)),
    fp32 sum per 128-k group times its scale): it must equal x @ dequant(W)^T."""
    g = torch.Generator().manual_seed(3)
    N, K = 48, 512
    q, s, z = ref.random_w4a16(N, K, G, sym=sym, dtype=dtype, gen=g)
    w = w4mma.prepare_mma(q, s, z, G, dtype)
    assert w.words.shape == (N // 16, K // 64, 32, 4) and w.sz.shape == (N // 16, K // 128, 16)
    x = torch.randn(5, K, generator=g).to(dtype)
    r = x.float() @ ref.dequant_w4(q, s, z).float().T
    assert ((w4mma.emulate(x, w) - r).norm() / r.norm()).item() < 1e-5


def test_scale_zero_words():
    """sz word of (tile, group, row): scale bits in the high half, bits of -(128 + z) (bf16) in the low half."""
    q, s, z = ref.random_w4a16(16, 256, 128, sym=False, dtype=torch.bfloat16, gen=torch.Generator().manual_seed(1))
    w = w4mma.prepare_mma(q, s, z, 128)
    word = int(w.sz[0, 1, 5]) & 0xFFFFFFFF
    hi = torch.tensor([word >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    lo = torch.tensor([word & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert hi.item() == s[5, 1].item() and lo.item() == -(128 + z[5, 1].item())


def test_unsupported_shapes_rejected():
    q, s, z = ref.random_w4a16(24, 256, 128, sym=True, dtype=torch.bfloat16)          # N % 16 != 0
    assert not w4mma.supported(24, 256, 128)
    with pytest.raises(SpecqError):
        w4mma.prepare_mma(q, s, z, 128)
    assert not w4mma.supported(32, 576, 64)                                           # SmolLM2's K, group 64


def test_configs():
    """M <= 8: one n8 tile; <= 16: two; warps split K into an even number of 64-k blocks each."""
    for M, N, K in [(1, 4096, 4096), (8, 4096, 14336), (9, 6144, 4096), (16, 4096, 14336), (1, 1536, 576 * 2 + 128)]:
        c = w4mma.default_config(M, N, K)
        assert c.NT == (1 if M <= 8 else 2)
        assert (K // 64) % c.WARPS == 0 and (K // 64 // c.WARPS) % 2 == 0


def test_source_is_complete():
    src = w4mma.source(2, 28, 8, 8, False, 2, True, 2, False, False)
    for tok in ("MAGIC_BITS", "ONE_BITS", "{NT}", "{KBW}"):
        assert tok not in src
    assert "#define NT 2" in src and "#define KBW 28" in src and ".L2::256B" in src
    assert '#define HTYPE "bf16x2"' in src and '#define HTYPE "f16x2"' in w4mma.source(1, 8, 8, 8, True)


def test_prepare_w4a16_keeps_cuda_layout_only_on_cuda():
    q, s, z = ref.random_w4a16(64, 256, 128, sym=True, dtype=torch.bfloat16)
    w = W.prepare_w4a16(q, s, z, 128)
    assert w.mma is None                                  # CPU tensors: no second copy
    w2 = W.prepare_w4a16(q, s, z, 128, mma=True)
    assert isinstance(w2.mma, w4mma.MMAWeight) and w2.qweight.numel() > 0
    x = torch.randn(3, 256).to(torch.bfloat16)          # CPU input: the reference path, whatever is prepared
    r = x.float() @ ref.dequant_w4(q, s, z).float().T
    for ww in (w, w2):
        assert ((W.w4a16_linear(x, ww).float() - r).norm() / r.norm()).item() < 1e-2


def test_mma_only_layout(monkeypatch):
    """SPECQ_W4_LAYOUTS=mma keeps one copy of the words (the CUDA kernel's); without CUDA the reference path runs."""
    monkeypatch.setattr(W, "LAYOUTS", "mma")
    q, s, z = ref.random_w4a16(64, 256, 128, sym=True, dtype=torch.bfloat16)
    w = W.prepare_w4a16(q, s, z, 128, mma=True)
    assert w.qweight.numel() == 0 and w.scales.numel() == 0 and w.mma is not None
    x = torch.randn(20, 256).to(torch.bfloat16)
    r = x.float() @ ref.dequant_w4(q, s, z).float().T
    assert ((W.w4a16_linear(x, w).float() - r).norm() / r.norm()).item() < 1e-2


def test_bad_layouts_value_is_one_error(monkeypatch):
    monkeypatch.setattr(W, "LAYOUTS", "fast")
    q, s, z = ref.random_w4a16(64, 256, 128, sym=True, dtype=torch.bfloat16)
    with pytest.raises(SpecqError, match="SPECQ_W4_LAYOUTS"):
        W.prepare_w4a16(q, s, z, 128)


def test_w4mma_linear_rejects_bad_shapes():
    """Checked before anything touches the GPU: wrong K, no tokens, more than MAX_M tokens."""
    q, s, z = ref.random_w4a16(32, 256, 128, sym=True, dtype=torch.bfloat16)
    w = w4mma.prepare_mma(q, s, z, 128)
    for x in (torch.zeros(2, 128), torch.zeros(0, 256), torch.zeros(w4mma.MAX_M + 1, 256)):
        with pytest.raises(SpecqError, match="w4mma"):
            w4mma.w4mma_linear(x.to(torch.bfloat16), w)


def test_fused_variants_source_and_compile(tmp_path):
    """The fused prologue / epilogue variants are complete CUDA C; with nvcc present they compile for sm_90."""
    import shutil
    import subprocess
    srcs = {(pro, res): w4mma.source(1, 14, 8, 16, False, 2, False, 2, False, False, pro, res, 1e-5)
            for pro in (0, 1) for res in (False, True)}
    assert "#define PRO 1" in srcs[1, False] and "#define RES 1" in srcs[0, True] and "#define EPS 1e-05f" in srcs[1, True]
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: source checked only")
    for (pro, res), src in srcs.items():
        f = tmp_path / f"k{pro}{int(res)}.cu"
        f.write_text(src)
        r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-o", str(f.with_suffix(".cubin")), str(f)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]


def test_wave_rule_only_where_16_warp_ctas_leave_a_partial_wave():
    """132 SMs: qkv_proj of Llama-3-8B (384 row tiles, 1.45 waves of 2 x 16-warp CTAs per SM) gets 3 x 8-warp CTAs
    per SM; o / down and an unknown SM count keep the 16-warp default."""
    assert w4mma.default_config(1, 6144, 4096, 132)[:2] == (1, 8) and w4mma.default_config(1, 6144, 4096, 132).MINB == 3
    for N, K in [(4096, 4096), (4096, 14336)]:
        assert w4mma.default_config(1, N, K, 132).WARPS == 16
    assert w4mma.default_config(1, 6144, 4096).WARPS == 16


def test_one_token_configs_tuned_under_pdl(monkeypatch):
    """One token (session 11): qkv_proj keeps 4 blocks in flight; many-wave shapes of K <= 4096 (gate_up_proj,
    lm_head) run 8 warps, 4 blocks, 3 CTAs per SM; two tokens, K = 8192 (70B) and SPECQ_W4_OLD_M1 keep the old ones."""
    old = w4mma.Cfg(1, 16, 8, 2, False, 2)
    assert w4mma.default_config(1, 6144, 4096, 132) == w4mma.Cfg(1, 8, 4, 2, False, 3)
    for N in (28672, 128256):
        assert w4mma.default_config(1, N, 4096, 132) == w4mma.Cfg(1, 8, 4, 2, False, 3)
        assert w4mma.default_config(2, N, 4096, 132) == old
    assert w4mma.default_config(1, 57344, 8192, 132) == old
    assert w4mma.default_config(2, 6144, 4096, 132) == w4mma.Cfg(1, 8, 8, 2, False, 3)
    monkeypatch.setattr(w4mma, "OLD_M1", True)
    assert w4mma.default_config(1, 28672, 4096, 132) == old
    assert w4mma.default_config(1, 6144, 4096, 132) == w4mma.Cfg(1, 8, 8, 2, False, 3)
