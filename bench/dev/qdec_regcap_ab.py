"""A/B of w4mma's register cap for compensated one-token Linears (specq.compensate.mma.qd_config: an SM keeps room
for one qdec1 CTA beside MINB w4mma CTAs, so a one-wave grid stays one wave; Llama-3-8B down_proj), timed like
bench/qdec_overhead.py (CUDA graphs over 4 distinct layers of random weights, fresh activations before every replay,
median per layer, 3 interleaved rounds), w4mma base (k = 0) in the same call; the checks of qdec_overhead.check_mma
first (with the auto cap). PYTHONPATH=$PWD CAPS=0,-1,56 python bench/dev/qdec_regcap_ab.py [k ...]"""
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import SHAPES, SpecqW4, check_mma, graph_time, layer_inputs, rand_residual  # noqa: E402
from specq.compensate import CompensatedLinear  # noqa: E402
from specq.compensate import mma  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear  # noqa: E402

CAPS = [int(v) for v in os.environ.get("CAPS", "0,-1").split(",")]


@torch.inference_mode()
def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    mma.REGCAP = -1
    check_mma(dev, print)
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
    ks = [float(v) for v in sys.argv[1:]] or [0.005, 0.01]
    res = {}
    for _ in range(3):
        set_k(0)
        res.setdefault("base", []).append(graph_time(step, xs_flat, pool, 60) / L)
        for cap in CAPS:
            mma.REGCAP = cap
            for kf in ks:
                set_k(kf)
                res.setdefault((cap, kf), []).append(graph_time(step, xs_flat, pool, 60) / L)
    base = statistics.median(res.pop("base"))
    print(f"w4mma base {base:.1f} us per layer")
    for (cap, kf), v in res.items():
        t = statistics.median(v)
        print(f"regcap {cap:3d} k {kf:.4f}: {t:6.1f} us  ({100 * (t / base - 1):+.1f}%)  rounds "
              f"{' '.join(f'{u:.1f}' for u in v)}", flush=True)


if __name__ == "__main__":
    main()
