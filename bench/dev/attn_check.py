"""Attention kernel (specq.kernels.attention) on the GPU: error against the fp32 reference and time against torch
SDPA (the grouped-query reshape specq used before for more than one token), Llama-3-8B / 70B / SmolLM2 head
shapes, M = 1..64 query tokens (a chain block after L context slots), several cache sizes; CUDA-graph timings
(20 calls per replay).   PYTHONPATH=$PWD python bench/dev/attn_check.py [--quick]"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import attention as DA  # noqa: E402


def sdpa(q, K, V, mask):   # q [H, M, hd], mask [M, S]: the reshape llama.Attention uses without the kernel
    H, M, hd = q.shape
    Hkv = K.shape[0]
    rep = H // Hkv
    qg = q.reshape(Hkv, rep * M, hd)
    y = F.scaled_dot_product_attention(qg[None], K[None], V[None], attn_mask=mask.repeat(rep, 1))
    return y[0].reshape(H, M, hd)


@torch.inference_mode()
def main():
    torch.manual_seed(0)
    quick = "--quick" in sys.argv
    worst = 0.0
    Ms = (1, 2, 4, 8, 16, 32, 64)
    for name, H, Hkv, hd in (("llama3-8b", 32, 8, 128), ("llama3-70b", 64, 8, 128), ("smollm2", 9, 3, 64)):
        for S, L in (((512, 200), (2048, 1500)) if quick else ((512, 200), (512, 400), (2048, 1500), (8192, 300), (8192, 8000))):
            for M in Ms:
                if L + M > S:
                    continue
                q = torch.randn(H, M, hd, device="cuda", dtype=torch.bfloat16)
                K = torch.randn(Hkv, S, hd, device="cuda", dtype=torch.bfloat16)
                V = torch.randn(Hkv, S, hd, device="cuda", dtype=torch.bfloat16)
                mask = torch.zeros(M, S, dtype=torch.bool, device="cuda")
                mask[:, :L] = True
                mask[:, L:L + M] = torch.ones(M, M, dtype=torch.bool, device="cuda").tril()
                if not DA.usable(q, K, mask):
                    print(f"{name} M={M}: not usable")
                    continue
                y = DA.attention(q, K, V, mask)
                r = DA.attention_ref(q, K, V, mask)
                e = ((y.float() - r.float()).norm() / r.float().norm()).item()
                e2 = ((sdpa(q, K, V, mask).float() - r.float()).norm() / r.float().norm()).item()
                worst = max(worst, e)
                tk = graph_time([lambda: DA.attention(q, K, V, mask)], reps=20)
                ts = graph_time([lambda: sdpa(q, K, V, mask)], reps=20)
                print(f"{name:10s} S={S:5d} L={L:5d} M={M:3d}  rel err {e:.2e} (sdpa {e2:.2e})  kernel {tk:6.1f} us  "
                      f"sdpa {ts:6.1f} us  ({ts / tk:.2f}x)", flush=True)
    print(f"worst rel err {worst:.2e}", "OK" if worst < 1e-2 else "FAIL")


if __name__ == "__main__":
    main()
