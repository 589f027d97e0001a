"""GPU check: every quantized Linear module's CUDA path (its registered Triton kernel) against the same
module's reference math on CPU, random layers, M in {1, 7, 64}; prints PASS/FAIL lines and exits 1 on a failure.

    PYTHONPATH=$PWD python3 bench/check_modules_cuda.py
"""
import sys

import torch

from specq.quant.w8a8 import W4A8Linear, W8A8Linear
from specq.quant.wq import WQLinear


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    torch.manual_seed(0)
    bad = 0
    for K, N in ((512, 384), (1024, 2048)):
        lin = torch.nn.Linear(K, N, bias=True)
        mods = {"w4a16-g128": WQLinear.from_linear(lin, 4, 128, False), "w4a16-pc": WQLinear.from_linear(lin, 4, -1, True),
                "w8a8": W8A8Linear.from_linear(lin), "w4a8-pc": W4A8Linear.from_linear(lin, -1),
                "w4a8-g128": W4A8Linear.from_linear(lin, 128)}
        for name, m in mods.items():
            for M in (1, 7, 64):
                x = torch.randn(M, K)
                ref = m(x)                                     # CPU reference math (fp32)
                mc = m.to("cuda", torch.bfloat16) if name.startswith("w4a16") else m.to("cuda")
                y = mc(x.to("cuda", torch.bfloat16)).float().cpu()
                e = rel(y, ref)
                ok = e < 2e-2 and torch.isfinite(y).all()
                bad += not ok
                print(f"{'PASS' if ok else 'FAIL'} {name:<10} K={K:<5} N={N:<5} M={M:<3} rel_err={e:.2e} "
                      f"kernel={'yes' if getattr(mc, '_w4a16', None) is not None or getattr(mc, '_w8a8', None) is not None or getattr(mc, '_w4a8', None) is not None else 'no'}")
                m.to("cpu", torch.float32)
    print("ALL PASS" if not bad else f"{bad} FAILED")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
