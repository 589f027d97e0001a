"""Is the wgmma kernel's gate_up (Llama-3-8B, 64 tokens) bound by its busiest SM (wave quantization: 224 CTAs of 128
rows on 132 SMs x 2 slots) or by the whole GPU's bandwidth? Times the same per-CTA work with N giving 132, 224 and
264 CTAs (random weights, graph replays). PYTHONPATH=$PWD python bench/dev/wg_balance.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4wg as V  # noqa: E402


@torch.inference_mode()
def main():
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    g = torch.Generator().manual_seed(1)
    K = 4096
    for M in (64, 32):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        for N in (16896, 28672, 33792):
            q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
            w = V.prepare_wg(q, s, z, 128)
            for name, c in {"wide": V.WgCfg(WG=1, RT=2, MINB=2, SPLIT=1)}.items():
                t = graph_time([lambda: V.w4wg_linear(x, w, c)])
                ctas = N // 128
                print(f"M={M} N={N} {name}: {ctas} CTAs ({ctas / 132:.2f} per SM, busiest {-(-ctas // 132)}): "
                      f"{t:6.1f} us, {N * K / 2 / t / 1e3:5.0f} GB/s of weights", flush=True)
            del w, q, s, z
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
