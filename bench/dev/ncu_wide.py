"""One wide-kernel W4A16 matmul (bench/dev/w4wide_exp.py) of a Llama-3-8B layer, launched a few times, for Nsight
Compute: ncu -k regex:w4wide --launch-skip 3 --launch-count 1 python bench/dev/ncu_wide.py gate_up 64 RT=2,WARPS=4"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4mma  # noqa: E402
from bench.dev import w4wide_exp as w4wide  # noqa: E402

name, m = sys.argv[1], int(sys.argv[2])
kw = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in sys.argv[3].split(",")) if len(sys.argv) > 3 else {}
K, N = next((K, N) for nm, K, N in MODELS["llama3-8b"] if nm == name)
g = torch.Generator().manual_seed(1)
w = w4mma.prepare_mma(*ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g), 128)
x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
for _ in range(6):
    w4wide.w4wide_linear(x, w, w4wide.WideCfg(**kw))
torch.cuda.synchronize()
