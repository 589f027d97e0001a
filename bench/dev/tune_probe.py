"""What specq.compensate.tune.measure_layer sees per Llama-3-8B projection (w4mma and W3A16 bases, random weights):
us per call of a CUDA graph of back-to-back calls at k per chunk 0, 1, 2, 4, 8, and the slowdown against k = 0.
    PYTHONPATH=$PWD python bench/dev/tune_probe.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import SHAPES, SpecqW4, acts, rand_residual, wq_base  # noqa: E402
from specq.compensate import CompensatedLinear  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402
from specq.compensate.tune import measure_layer  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear  # noqa: E402

dev = torch.device("cuda")
torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__)
for name, make in (("w4mma", lambda K, N: SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear)),
                   ("w3a16", lambda K, N: wq_base(K, N, 3, dev))):
    for p, (K, N) in SHAPES.items():
        ch = torch.exp(torch.randn(K, device=dev))
        cl = CompensatedLinear(make(K, N), rand_residual(K, N), k_chunk=0, selector="approx",
                               stats=SEL.calib_stats(acts(256, K, ch, dev).float().cpu()))
        ts = [(kc, measure_layer(cl, kc) * 1e6) for kc in (0, 1, 2, 4, 8, 0)]
        print(f"{name} {p:13s} " + "  ".join(f"kc{kc} {t:.2f} us ({100 * (t / ts[0][1] - 1):+.1f}%)" for kc, t in ts))
