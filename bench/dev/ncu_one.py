"""One W4A16 matmul of a Llama-3-8B layer, launched a few times, for Nsight Compute:
ncu -k regex:w4a16 --launch-skip 3 --launch-count 1 python bench/dev/ncu_one.py gate_up 1"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels.w4a16 import prepare_w4a16, w4a16_linear  # noqa: E402

name, m = sys.argv[1], int(sys.argv[2])
cfg = tuple(int(v) for v in sys.argv[3].split(",")) if len(sys.argv) > 3 else None
K, N = next((K, N) for nm, K, N in MODELS["llama3-8b"] if nm == name)
g = torch.Generator().manual_seed(1)
w = prepare_w4a16(*ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g), 128)
x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
for _ in range(6):
    w4a16_linear(x, w, cfg=cfg)
torch.cuda.synchronize()
