"""EXPERIMENT (not in the library): SiLU-and-multiply in gate_up_proj's epilogue instead of its own kernel.

gate_up's rows are interleaved once so that every 16-row tile of the few-token kernel holds 8 gate rows (tile rows
0..7) and the 8 matching up rows (8..15): lane (g, t)'s accumulators c0/c1 (row g) and c2/c3 (row g + 8) are then
gate and up of the same output channel, and the epilogue writes silu(gate) * up, rounded as torch rounds
F.silu(g) * u after a bf16 gate_up, into y [M, I]. The kernel source is w4mma's with its epilogue (w4mma._EPILOGUE) replaced here.
It would remove one kernel per layer (SiLU*mul, 39 us per 8B step in decode_variants.txt, session 9).
MEASURED (session 10, H100): bit-equal, but 25.97 us against 25.62 for gate_up + the separate kernel: no gain, not
integrated (kernels_w4a16_dev.txt run 15).
  python bench/dev/glu_ab.py --check-cpu        (CPU: the row interleave against the unpermuted reference, through
                                                 w4mma.emulate; nvcc compile of the patched source if nvcc exists)
  PYTHONPATH=$PWD python3 bench/dev/glu_ab.py    (GPU: bit-equality with the separate ops, then the A/B)"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.kernels import ref, w4mma  # noqa: E402

NEW = '''    for (int i = threadIdx.x; i < NT * 64; i += WARPS * 32) {   // GLU: (gate, up) pairs of the tile's 8 channels
        const int n = i >> 6, l = (i >> 1) & 31, r = i & 1;
        float gs = 0.f, us = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; v++) {
            gs += ((const float*)&red[v][n][l])[r];
            us += ((const float*)&red[v][n][l])[r + 2];
        }
        const int ch = tile * 8 + (l >> 2);
        const int tok = 8 * n + 2 * (l & 3) + r;
        const float g = f32(to16(gs));
        const u16 sg = to16(g / (1.0f + expf(-g)));
        if (tok < M) y[(size_t)tok * sym + ch] = to16(f32(sg) * f32(to16(us)));
    }'''


def glu_source(NT, KBW, P, WARPS, MINB, pro, eps):
    src = w4mma.source(NT, KBW, P, WARPS, False, MINB, False, 2, False, False, pro, False, eps)
    assert w4mma._EPILOGUE in src
    return src.replace(w4mma._EPILOGUE, NEW)


def interleave(t: torch.Tensor) -> torch.Tensor:
    """Rows [gate (I) | up (I)] -> tiles of [8 gate rows | the 8 matching up rows]."""
    I = t.shape[0] // 2
    idx = torch.arange(2 * I, device=t.device).view(2, I // 8, 8).permute(1, 0, 2).reshape(-1)
    return t[idx]


def glu_linear(x, mw, norm_w=None, eps=0.0):
    """x [M, K] -> silu(gate) * up [M, N/2] with mw prepared from interleave()d weights (M <= 8; M = 1 with norm_w)."""
    M, K = x.shape
    c = w4mma.default_config(M, mw.N, K)
    KBW = K // 64 // c.WARPS
    c = c._replace(P=max(2, min(c.P, KBW)))
    pro = norm_w is not None
    k = w4mma.compiled(("glu", c, KBW, pro, eps), lambda: glu_source(c.NT, KBW, c.P, c.WARPS, c.MINB, pro, eps), "w4mma")
    y = torch.empty(M, mw.N // 2, dtype=x.dtype, device=x.device)
    k(grid=(mw.N // 16, 1, 1), block=(c.WARPS * 32, 1, 1), shared_mem=K * 2 if pro else 0,
      args=[mw.words, mw.sz, x, y, M, K, x.stride(0), y.stride(0), norm_w if pro else x, y, 0, y, y, 0, y, y])
    return y


def check_cpu():
    g = torch.Generator().manual_seed(0)
    N, K, M = 64, 256, 3
    q, s, z = ref.random_w4a16(N, K, 128, True, torch.float32, "cpu", g)
    x = torch.randn(M, K, generator=g)
    full = w4mma.emulate(x, w4mma.prepare_mma(q, s, z, 128, torch.bfloat16))           # [M, N]: gate | up
    want = F.silu(full[:, :N // 2]) * full[:, N // 2:]
    perm = w4mma.emulate(x, w4mma.prepare_mma(interleave(q), interleave(s), interleave(z), 128, torch.bfloat16))
    t = perm.view(M, N // 16, 2, 8)                                                 # [M, tile, gate|up, 8]
    got = (F.silu(t[:, :, 0]) * t[:, :, 1]).reshape(M, N // 2)
    torch.testing.assert_close(got, want)
    print("interleave: every tile's rows 0..7 are gate channels 8t..8t+7, rows 8..15 their up rows: ok")
    if shutil.which("nvcc"):
        for pro in (False, True):
            d = Path(tempfile.mkdtemp())
            (d / "k.cu").write_text(glu_source(1, 4, 8, 16, 2, pro, 1e-5))
            r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "--resource-usage", "-o", str(d / "k.cubin"),
                                str(d / "k.cu")], capture_output=True, text=True)
            regs = [ln.split(":")[-1].strip() for ln in (r.stdout + r.stderr).splitlines() if "registers" in ln]
            print(f"nvcc sm_90, norm prologue {pro}: rc {r.returncode} {regs}")
            assert r.returncode == 0, r.stderr[-2000:]


@torch.no_grad()
def gpu():
    from bench.kernels import graph_time
    from specq.models.llama import RMSNorm
    g = torch.Generator().manual_seed(0)
    K, I, dt = 4096, 14336, torch.bfloat16
    q, s, z = ref.random_w4a16(2 * I, K, 128, True, dt, "cuda", g)
    mw = w4mma.prepare_mma(q, s, z, 128, dt)
    mwg = w4mma.prepare_mma(interleave(q), interleave(s), interleave(z), 128, dt)
    norm = RMSNorm(K, 1e-5).to("cuda", dt)
    silu_c = torch.compile(lambda gu: F.silu(gu[:, :I]) * gu[:, I:])
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, Llama-3-8B gate_up + SiLU*mul")
    for M in (1,):                                    # the fused norm takes one token
        x = torch.randn(M, K, generator=g).to("cuda", dt) * 3
        gu = w4mma.w4mma_linear(x, mw, norm_w=norm.weight, eps=1e-5)
        want = F.silu(gu[:, :I]) * gu[:, I:]
        got = glu_linear(x, mwg, norm.weight, 1e-5)
        eq = (got == want).float().mean().item()
        e = ((got.float() - want.float()).norm() / want.float().norm()).item()
        sep = graph_time([lambda: silu_c(w4mma.w4mma_linear(x, mw, norm_w=norm.weight, eps=1e-5))], reps=20)
        one = graph_time([lambda: glu_linear(x, mwg, norm.weight, 1e-5)], reps=20)
        print(f"  M={M}: bit-equal {eq:.4f} rel_err {e:.1e} | separate {sep:6.2f} us  GLU epilogue {one:6.2f} us")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-cpu", action="store_true")
    a = ap.parse_args()
    check_cpu() if a.check_cpu else gpu()
