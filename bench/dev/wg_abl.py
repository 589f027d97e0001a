"""Timing ablations of the wgmma W4A16 kernel (specq/kernels/w4wg.py ABL bits; results are wrong by design, only the
time matters): where a 64-token matmul's time goes. [BASES=wg1rt2,wg4] [ABLS=full,no-x] PYTHONPATH=$PWD python bench/dev/wg_abl.py"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4a16 as W  # noqa: E402
from specq.kernels import w4wg as V  # noqa: E402

ABL = {"full": 0, "no-dequant": 1, "no-wgmma": 2, "no-x": 4, "no-w": 8, "only-loads": 3, "no-x-w": 12,
       "nothing": 15}
BASES = {"wg1rt2": V.WgCfg(WG=1, RT=2, MINB=2), "wg1": V.WgCfg(WG=1, MINB=4, TARGET=264),
         "wg4": V.WgCfg(WG=4, RT=1, MINB=1), "wg1cl": V.WgCfg(WG=1, MINB=4, TARGET=264, CL=1),
         "wg1rt2cl": V.WgCfg(WG=1, RT=2, MINB=2, TARGET=264, CL=1)}


@torch.inference_mode()
def main():
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    g = torch.Generator().manual_seed(1)
    for name, K, N in MODELS["llama3-8b"]:
        q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
        w = W.prepare_w4a16(q, s, z, 128)
        for m in (64,):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            tri = graph_time([lambda: W.w4a16_linear(x, w, cfg=W.default_config(m, N, K))])
            row = []
            wg = V.prepare_wg(q, s, z, 128)
            for base in os.environ.get("BASES", "wg1rt2,wg1").split(","):
                c0 = BASES[base]
                for k, a in ABL.items():
                    if os.environ.get("ABLS") and k not in os.environ["ABLS"].split(","):
                        continue
                    row.append(f"{base}/{k} {graph_time([lambda a=a: V.w4wg_linear(x, wg, c0._replace(ABL=a))]):6.1f}")
            print(f"M={m} {name:8s} triton {tri:6.1f} | " + " ".join(row), flush=True)


if __name__ == "__main__":
    main()
