"""Check every specq kernel against its plain-torch reference on random data (GPU; run before benchmarks).

python bench/check_kernels.py [--quick]   -> prints one line per case, exits 1 on any failure.
Relative error ||y - ref|| / ||ref|| must be <= 1e-2 (bf16/fp16 outputs) and every output finite.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from specq.kernels import ref                                    # noqa: E402
from specq.kernels.int8 import prepare_w4a8, prepare_w8a8, w4a8_linear, w8a8_linear  # noqa: E402
from specq.kernels.w3a16 import pack3, prepare_w3a16, w3a16_linear        # noqa: E402
from specq.kernels.w4a16 import prepare_w4a16, w4a16_linear        # noqa: E402

MS = [1, 2, 4, 8, 16, 32, 64, 128]
TOL = 1e-2


def layer_shapes(hidden, inter, heads, kv_heads, head_dim):
    """The four weight matmuls of one Llama decoder layer as (name, K, N)."""
    return [("qkv", hidden, (heads + 2 * kv_heads) * head_dim), ("o", heads * head_dim, hidden),
            ("gate_up", hidden, 2 * inter), ("down", inter, hidden)]


MODELS = {"llama3-8b": layer_shapes(4096, 14336, 32, 8, 128),
          "llama3-70b": layer_shapes(8192, 28672, 64, 8, 128)}


def rel(y, r):
    return ((y.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()


def check(quick=False, ms=MS, models=None, out=print, w4a16_only=False):
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    fails, rows = 0, []
    models = models or (["llama3-8b"] if quick else list(MODELS))

    def report(name, shape, m, e, y):
        nonlocal fails
        ok = e <= TOL and bool(torch.isfinite(y).all())
        fails += not ok
        rows.append((name, shape, m, e, ok))
        if not ok or m == ms[-1]:
            out(f"{'ok ' if ok else 'BAD'} {name:22s} {shape:22s} M={m:<4d} rel_err={e:.2e}")

    for model in models:
        for lname, K, N in MODELS[model]:
            shape = f"{model}/{lname}[{K}x{N}]"
            x = torch.randn(max(ms), K, generator=g).to(dev, torch.bfloat16)
            variants = [("w4a16-g128-sym", 128, True, torch.bfloat16, None),
                        ("w4a16-g128-asym", 128, False, torch.bfloat16, None),
                        ("w4a16-pc-sym", None, True, torch.bfloat16, None)]
            if lname == "qkv":
                variants += [("w4a16-g128-asym-fp16", 128, False, torch.float16, None),
                             ("w4a16-g128-asym-noasm", 128, False, torch.bfloat16, False)]
            for name, G, sym, dt, asm in variants:
                q, s, z = ref.random_w4a16(N, K, G, sym, dt, dev, g)
                w = prepare_w4a16(q, s, z, G, dt)
                xd = x.to(dt)
                r = ref.ref_w4a16(xd, q, s, z)
                for m in ms:
                    y = w4a16_linear(xd[:m], w, asm=asm)
                    report(name, shape, m, rel(y, r[:m]), y)
                del q, s, z, w, r
            if w4a16_only:
                continue
            w8, sw = ref.random_w8a8(N, K, dev, g)
            w = prepare_w8a8(w8, sw)
            r = ref.ref_w8a8(x, w8, sw)
            for m in ms:
                y = w8a8_linear(x[:m], w)
                report("w8a8", shape, m, rel(y, r[:m]), y)
            del w8, sw, w, r
            for grouped in (False, True):
                q, sw, gs = ref.random_w4a8(N, K, grouped, dev, g)
                w = prepare_w4a8(q, sw, gs)
                r = ref.ref_w4a8(x, q, sw, gs)
                for m in ms:
                    y = w4a8_linear(x[:m], w)
                    report("w4a8-g128" if grouped else "w4a8-pc", shape, m, rel(y, r[:m]), y)
                if lname == "qkv":
                    y = w4a8_linear(x, w, asm=False)
                    report("w4a8-noasm" + ("-g128" if grouped else "-pc"), shape, max(ms), rel(y, r), y)
                del q, sw, gs, w, r
            for name, G, sym in (("w3a16-g128-asym", 128, False), ("w3a16-pc-sym", None, True)):
                Gs = G or K
                q3 = torch.randint(0, 8, (N, K), generator=g).to(dev, torch.uint8)
                s3 = (torch.rand(N, K // Gs, generator=g) * 0.02 + 0.001).to(dev, torch.bfloat16)
                z3 = (torch.full((N, K // Gs), 4.0) if sym else
                      torch.randint(0, 8, (N, K // Gs), generator=g).float()).to(dev, torch.bfloat16)
                W3 = ((q3.float() - z3.float().repeat_interleave(Gs, 1)) * s3.float().repeat_interleave(Gs, 1))
                r = x.float() @ W3.to(torch.bfloat16).float().t()            # the reference: (q - z) * s, one rounding
                w = prepare_w3a16(pack3(q3), s3, z3, G or -1, K)
                for m in ms:
                    y = w3a16_linear(x[:m], w)
                    report(name, shape, m, rel(y, r[:m]), y)
                del q3, s3, z3, W3, r, w
            torch.cuda.empty_cache()
    fails += check_fused(models, out, rows, g)
    out(f"check_kernels: {len(rows) - fails} passed, {fails} failed")
    return fails, rows


def check_fused(models, out, rows, g) -> int:
    """The few-token CUDA kernel with its fused RMSNorm prologue and residual epilogue
    against the separate torch ops around the same kernel unfused; also prints the share of bit-equal outputs."""
    from specq.kernels import w4mma
    from specq.models.llama import RMSNorm
    if not w4mma.available():
        out("fused: w4mma not available, skipped")
        return 0
    fails, dev = 0, "cuda"
    for model in models:
        for lname, K, N in MODELS[model]:
            q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, dev, g)
            mw = w4mma.prepare_mma(q, s, z, 128, torch.bfloat16)
            norm = RMSNorm(K, 1e-5).to(dev, torch.bfloat16)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.1 * torch.randn(K, generator=g).to(dev))
            for m in (1, 2, 4, 8, 16):
                x = torch.randn(m, K, generator=g).to(dev, torch.bfloat16) * 3
                res = torch.randn(m, N, generator=g).to(dev, torch.bfloat16)
                cases = [("res", lambda: w4mma.w4mma_linear(x, mw, res=res), lambda: res + w4mma.w4mma_linear(x, mw))]
                if w4mma.fusable(m, K):
                    cases += [("norm", lambda: w4mma.w4mma_linear(x, mw, norm_w=norm.weight, eps=1e-5),
                               lambda: w4mma.w4mma_linear(norm(x), mw)),
                              ("norm+res", lambda: w4mma.w4mma_linear(x, mw, norm_w=norm.weight, eps=1e-5, res=res),
                               lambda: res + w4mma.w4mma_linear(norm(x), mw))]
                for name, f, r in cases:
                    with torch.no_grad():
                        y, yr = f(), r()
                    e = rel(y, yr)
                    ok = e <= TOL and bool(torch.isfinite(y).all())
                    fails += not ok
                    rows.append((f"w4mma-fused-{name}", f"{model}/{lname}", m, e, ok))
                    out(f"{'ok ' if ok else 'BAD'} w4mma-fused-{name:9s} {model}/{lname:8s} M={m:<3d} rel_err={e:.2e} "
                        f"bit-equal {(y == yr).float().mean().item():.4f}")
    from specq.kernels import rope as RC                      # rope + KV-cache write, Llama-3 head shapes
    for M in (1, 4, 16):
        qkv = torch.randn(M, 48 * 128, generator=g).to(dev, torch.bfloat16)
        ang = torch.rand(M, 64, generator=g).to(dev) * 6
        cos, sin = torch.cat((ang, ang), -1).cos().bfloat16(), torch.cat((ang, ang), -1).sin().bfloat16()
        slots = torch.randperm(300, generator=g)[:M].to(dev)
        kc, vc = torch.randn(8, 300, 128, device=dev, dtype=torch.bfloat16), torch.randn(8, 300, 128, device=dev,
                                                                                        dtype=torch.bfloat16)
        kr, vr = kc.clone(), vc.clone()
        q, qr = RC._run(qkv, cos, sin, slots, kc, vc, 32, 8), RC.rope_cache_ref(qkv, cos, sin, slots, kr, vr, 32, 8)
        e = max(rel(q, qr), rel(kc, kr), rel(vc, vr))
        ok = e <= TOL and bool(torch.isfinite(q).all())
        fails += not ok
        rows.append(("rope-cache", "llama3", M, e, ok))
        out(f"{'ok ' if ok else 'BAD'} rope-cache H=32 Hkv=8 hd=128 M={M:<3d} rel_err={e:.2e} "
            f"bit-equal q {(q == qr).float().mean().item():.4f} k {(kc == kr).float().mean().item():.4f}")
    return fails + check_decode_attn(out, rows, g)


def check_decode_attn(out, rows, g, dev="cuda") -> int:
    """The two-launch decode attention (rope + cache write + split, then merge) against the three-kernel path
    (specq.kernels.rope, then attention.py's split and merge kernels) at Llama-3-8B / 70B head shapes, eager and as
    CUDA-graph replays."""
    from specq.kernels import attention as DA, decode_attn as DE, rope as RC
    fails = 0
    for nh, nkv, S in ((32, 8, 4096), (64, 8, 2048)):
        for slot in (0, 63, 64, 700, S - 1):
            qkv = torch.randn(1, (nh + 2 * nkv) * 128, generator=g).to(dev, torch.bfloat16)
            ang = torch.rand(1, 64, generator=g).to(dev) * 6
            cos, sin = torch.cat((ang, ang), -1).cos().bfloat16(), torch.cat((ang, ang), -1).sin().bfloat16()
            slots = torch.tensor([slot], device=dev)
            kc = torch.randn(nkv, S, 128, generator=g).to(dev, torch.bfloat16)
            vc = torch.randn(nkv, S, 128, generator=g).to(dev, torch.bfloat16)
            mask = torch.zeros(1, S, dtype=torch.bool, device=dev)
            mask[0, :slot + 1] = True
            mask[0, torch.randint(0, slot + 1, (slot // 4,), generator=g).to(dev)] = False
            mask[0, slot] = True
            kr, vr = kc.clone(), vc.clone()
            kf, vf = kc.clone(), vc.clone()          # the plain-torch reference (fp32 math)
            yf = DE.decode_attention_ref(qkv, cos, sin, slots, kf, vf, mask, nh, nkv)
            yr = DA._run(RC._run(qkv, cos, sin, slots, kr, vr, nh, nkv), kr, vr, mask).transpose(0, 1).reshape(1, -1)
            y = DE._run(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                yg = DE._run(qkv, cos, sin, slots, kc, vc, mask, nh, nkv)
            for _ in range(3):
                gr.replay()
            torch.cuda.synchronize()
            e = max(rel(y, yr), rel(yg, yr), rel(y, yf), rel(yr, yf))
            ok = (e <= TOL and bool(torch.isfinite(y).all()) and torch.equal(kc, kr) and torch.equal(vc, vr)
                  and torch.equal(y, yg))
            fails += not ok
            rows.append(("decode-attn", f"H={nh}", slot, e, ok))
            out(f"{'ok ' if ok else 'BAD'} decode-attn H={nh} Hkv={nkv} S={S} slot={slot:<5d} rel_err={e:.2e} "
                f"bit-equal y {(y == yr).float().mean().item():.4f} cache {torch.equal(kc, kr) and torch.equal(vc, vr)}"
                f" graph==eager {torch.equal(y, yg)}")
    return fails


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B shapes only")
    ap.add_argument("--w4a16-only", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_kernels needs a CUDA GPU")
    f, _ = check(a.quick, w4a16_only=a.w4a16_only)
    sys.exit(1 if f else 0)
