"""QDEC side-path variants on the GPU: fetch block width (residual words per program row), timed like bench/qdec_overhead.py (CUDA graph over 4 distinct Llama-3-8B layers, fresh activations
before every replay, median per layer), specq W4A16 base, approx selector, k in {0.005, 0.01, 0.02}.
PYTHONPATH=$PWD python bench/dev/qdec_variants.py [block_w ...]"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import SHAPES, SpecqW4, graph_time, layer_inputs, rand_residual  # noqa: E402
from specq.compensate import CompensatedLinear  # noqa: E402
from specq.compensate import kernel as KK  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear  # noqa: E402


@torch.inference_mode()
def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    L = 4
    stats, xs_flat, xs, pool = layer_inputs(dev)
    layers = [{p: CompensatedLinear(SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear), rand_residual(K, N), k_chunk=0,
                                    selector="approx", stats=stats[p]) for p, (K, N) in SHAPES.items()} for _ in range(L)]

    def step():
        for mods in layers:
            for p, cl in mods.items():
                cl(xs[p])

    def set_k(kf):
        for mods in layers:
            for cl in mods.values():
                cl.set_k(SEL.k_chunk_for(cl.in_features, kf))
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
