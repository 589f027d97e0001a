"""W3A16 Triton kernel (specq/kernels/w3a16.py) configs on the GPU, Llama-3-8B layer shapes: every config checked
against the reference product first (rel err <= 1e-2), then the 4-matmul layer timed in CUDA-graph replays per M,
beside torch int4 and bf16 cuBLAS in the same run. PYTHONPATH=$PWD python bench/dev/w3_sweep.py"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import w3a16 as K3  # noqa: E402


@torch.inference_mode()
def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    dev = "cuda"
    ws = []
    for name, K, N in MODELS["llama3-8b"]:
        q = torch.randint(0, 8, (N, K), device=dev, dtype=torch.uint8)
        s = (torch.rand(N, K // 128, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
        z = torch.randint(0, 8, (N, K // 128), device=dev).to(torch.bfloat16)
        w = K3.prepare_w3a16(K3.pack3(q), s, z, 128, K)
        W = K3.dequant_ref(w)
        ws.append((name, K, N, w, W, torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02))
    cfgs = list(itertools.product((64, 128), (64, 128), (2, 4), (4, 8)))
    for m in (1, 16, 64):
        xs = {K: torch.randn(m, K, device=dev, dtype=torch.bfloat16) for _, K, _, _, _, _ in ws}
        bf = graph_time([lambda K=K, B=B: torch.nn.functional.linear(xs[K], B) for _, K, _, _, _, B in ws])
        res = {}
        for c in cfgs:
            ok = True
            for name, K, N, w, W, _ in ws:
                y = K3.w3a16_linear(xs[K], w, c)
                r = xs[K].float() @ W.float().t()
                if not ((y.float() - r).norm() / r.norm()).item() < 1e-2:
                    ok = False
                    print("CHECK FAILED", m, name, c, flush=True)
            if ok:
                res[c] = graph_time([lambda K=K, w=w: K3.w3a16_linear(xs[K], w, c) for _, K, _, w, _, _ in ws])
        best = sorted(res.items(), key=lambda kv: kv[1])
        dflt = (K3.BN, K3.BK_MAX, K3.PER_SM, K3.WARPS)
        print(f"M={m}: bf16 {bf:.1f} us; default {dflt} {res.get(dflt, float('nan')):.1f}; best " +
              ", ".join(f"{c} {t:.1f}" for c, t in best[:5]) + f"; worst {best[-1][0]} {best[-1][1]:.1f}", flush=True)


if __name__ == "__main__":
    main()
