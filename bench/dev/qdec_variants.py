"""QDEC side-path variants on the GPU: fetch block width (residual words per program row), timed like bench/qdec_overhead.py (CUDA graph over 4 distinct Llama-3-8B layers, fresh activations
before every replay, median per layer), specq W4A16 base, approx selector, k in {0.005, 0.01, 0.02}.
PYTHONPATH=$PWD python bench/dev/qdec_variants.py [block_w ...]"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import graph_time, w4_chain  # noqa: E402
from specq.compensate import kernel as KK  # noqa: E402


@torch.inference_mode()
def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    L = 4
    layers, step, set_k, xs_flat, pool = w4_chain(dev, L)
    variants = sys.argv[1:] or ["16", "32"]
    res = {}
    for _ in range(3):
        set_k(0)
        res.setdefault("base", []).append(graph_time(step, xs_flat, pool, 60) / L)
        for v in variants:
            KK.FETCH_BLOCK_W = int(v)
            for kf in (0.005, 0.01, 0.02):
                set_k(kf)
                res.setdefault((v, kf), []).append(graph_time(step, xs_flat, pool, 60) / L)
    base = statistics.median(res.pop("base"))
    print(f"base {base:.1f} us per layer")
    for (bw, kf), v in res.items():
        t = statistics.median(v)
        print(f"{bw:8s} k {kf:.3f}: {t:6.1f} us  ({100 * (t / base - 1):+.1f}%)", flush=True)


if __name__ == "__main__":
    main()
