"""Per-shape launch configuration of the few-token W4A16 CUDA kernel at one token: warps per CTA and CTAs per SM
(wave quantization: qkv's 384 row tiles are 1.45 waves of the default 16-warp, 2-per-SM CTAs on 132 SMs).
Each matmul timed alone over 8 weight copies (no L2 reuse), CUDA-graph replays; output checked first.
PYTHONPATH=$PWD python bench/dev/mma_cfg.py [M]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import ref, w4mma  # noqa: E402

CFGS = {"16w2": (16, 2), "8w4": (8, 4), "8w3": (8, 3), "8w2": (8, 2), "4w8": (4, 8), "4w6": (4, 6)}


@torch.no_grad()
def main():
    M = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, llama3-8b, M={M}, us per matmul")
    for name, K, N in MODELS["llama3-8b"]:
        ws = []
        for _ in range(8):
            q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
            ws.append(w4mma.prepare_mma(q, s, z, 128, torch.bfloat16))
        x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
        r = w4mma.w4mma_linear(x, ws[0])
        line = []
        for cname, (warps, minb) in CFGS.items():
            if (K // 64) % (2 * warps):
                continue
            c = w4mma.Cfg(1 if M <= 8 else 2, warps, 8, 2, False, minb)
            y = w4mma.w4mma_linear(x, ws[0], c)
            e = ((y.float() - r.float()).norm() / r.float().norm()).item()
            t = graph_time([lambda w=w, c=c: w4mma.w4mma_linear(x, w, c) for w in ws], reps=5) / len(ws)
            line.append(f"{cname} {t:6.2f}{'' if e < 1e-3 else ' BAD'}")
        print(f"  {name:8s} N={N:<6d} K={K:<6d} " + "  ".join(line))


if __name__ == "__main__":
    main()
