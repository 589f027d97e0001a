"""Decode attention kernel on the GPU: error against the fp32 reference and time against torch SDPA (the
grouped-query reshape specq uses for more than one token), Llama-3-8B / 70B / SmolLM2 head shapes, several
cache sizes and context lengths; CUDA-graph timings (20 calls per replay).   PYTHONPATH=$PWD python bench/dev/attn_check.py"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import attention as DA  # noqa: E402


def sdpa(q, K, V, mask):
    H, hd = q.shape
    Hkv = K.shape[0]
    rep = H // Hkv
    y = F.scaled_dot_product_attention(q.reshape(1, Hkv, rep, hd), K[None], V[None],
                                       attn_mask=mask[None, :].expand(rep, -1))
    return y.reshape(H, hd)


@torch.inference_mode()
def main():
    torch.manual_seed(0)
    worst = 0.0
    for name, H, Hkv, hd in (("llama3-8b", 32, 8, 128), ("llama3-70b", 64, 8, 128), ("smollm2", 9, 3, 64)):
        for S, L in ((512, 200), (512, 512), (2048, 1500), (8192, 300), (8192, 8000)):
            q = torch.randn(H, hd, device="cuda", dtype=torch.bfloat16)
            K = torch.randn(Hkv, S, hd, device="cuda", dtype=torch.bfloat16)
            V = torch.randn(Hkv, S, hd, device="cuda", dtype=torch.bfloat16)
            mask = torch.zeros(S, dtype=torch.bool, device="cuda")
            mask[:L] = True
            y = DA.decode_attention(q, K, V, mask)
            r = DA.decode_attention_ref(q, K, V, mask)
            e = ((y.float() - r.float()).norm() / r.float().norm()).item()
            e2 = ((sdpa(q, K, V, mask).float() - r.float()).norm() / r.float().norm()).item()
            worst = max(worst, e)
            tk = graph_time([lambda: DA.decode_attention(q, K, V, mask)], reps=20)
            ts = graph_time([lambda: sdpa(q, K, V, mask)], reps=20)
            print(f"{name:10s} S={S:5d} L={L:5d}  rel err {e:.2e} (sdpa {e2:.2e})  kernel {tk:6.1f} us  "
                  f"sdpa {ts:6.1f} us  ({ts / tk:.2f}x)", flush=True)
    print(f"worst rel err {worst:.2e}", "OK" if worst < 1e-2 else "FAIL")


if __name__ == "__main__":
    main()
