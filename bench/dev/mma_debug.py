"""Which w4mma feature breaks correctness: each Cfg field toggled alone on small shapes (GPU)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4mma as C  # noqa: E402

g = torch.Generator().manual_seed(0)
for N, K in ((16, 1024), (64, 4096)):
    q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
    w = C.prepare_mma(q, s, z, 128)
    for M in (1, 8, 9, 16, 17, 32, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        r = x.float() @ ref.dequant_w4(q, s, z).float().T
        base = C.default_config(M, N, K)
        out = []
        for name, ch in {"def": {}, "roll1": {"ROLL": True}, "roll0": {"ROLL": False}, "xr0": {"XR": 0}, "xr1": {"XR": 1},
                         "xr2": {"XR": 2}, "pre1": {"PRE": True}, "pre0": {"PRE": False}, "p2": {"P": 2},
                         "p8": {"P": 8}, "w4": {"WARPS": 4}, "w1": {"WARPS": 1}}.items():
            c = base._replace(**ch)
            y = C.w4mma_linear(x, w, cfg=c).float()
            e = ((y - r).norm() / r.norm()).item()
            out.append(f"{name} {e:.1e}")
        print(f"N={N} K={K} M={M} {base}: " + "  ".join(out), flush=True)
