"""Tune W4A16 configs in the context of the whole layer (GPU experiment for the kernels issue).

    PYTHONPATH=$PWD python bench/dev/layer_tune.py [--ms 1,16,64]

bench/kernels.py's sweep times each matmul alone (20 launches of one weight per graph replay), where qkv / o
(<= 13 MB) stay in the 50 MB L2; the layer benchmark runs qkv, o, gate_up, down in turn over 116 MB. Here each
matmul's config is chosen by coordinate descent on the whole-layer graph time (2 passes), starting from
default_config; prints per M the default layer time, the tuned one with its configs, and torch int4's.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time, layer_fns, make_weights  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels.w4a16 import default_config, w4a16_linear  # noqa: E402


def candidates(m):
    BM = 16 if m <= 16 else 32 if m <= 32 else 64
    out = []
    if m <= 16:
        for sp in (2, 4, 8, 16):
            for r in (1, 2, 4):
                for ns in (2, 3, 4):
                    out.append((BM, 64, sp, r, 4, ns, False))
            out.append((BM, 128, sp, 1, 8, 3, False))
            out.append((BM, 128, sp, 2, 8, 2, False))
            out.append((BM, 32, sp, 2, 2, 3, False))
    else:
        for sp in (1, 2, 4, 8):
            for bn, nw in ((64, 4), (128, 8)):
                for pre in (False, True):
                    out.append((BM, bn, sp, 1, nw, 3, pre))
    return out


def layer_time(ws, xs, cfgs):
    fns = [lambda d=d, c=c: w4a16_linear(xs[d["K"]], d["w4a16"], cfg=c) for d, c in zip(ws, cfgs)]
    return graph_time(fns, reps=10, iters=15)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--time-limit", type=float, default=420)
    a = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    ws = make_weights(MODELS["llama3-8b"], "cuda")
    for m in map(int, a.ms.split(",")):
        xs = {d["K"]: torch.randn(m, d["K"], device="cuda", dtype=torch.bfloat16) for d in ws}
        for d in ws:                                       # every candidate is correct before it is timed
            q, s, z = d["w4a16_raw"]
            r = xs[d["K"]].float() @ ref.dequant_w4(q, s, z).T
            d["ok"] = []
            for c in candidates(m):
                y = w4a16_linear(xs[d["K"]], d["w4a16"], cfg=c)
                if ((y.float() - r).norm() / r.norm()).item() <= 1e-2:
                    d["ok"].append(c)
        cfgs = [tuple(default_config(m, d["N"], d["K"])) for d in ws]
        base = best = layer_time(ws, xs, cfgs)
        for _ in range(2):
            for i, d in enumerate(ws):
                for c in d["ok"]:
                    if time.time() - t0 > a.time_limit:
                        break
                    trial = cfgs[:i] + [c] + cfgs[i + 1:]
                    t = layer_time(ws, xs, trial)
                    if t < best * 0.995:
                        best, cfgs = t, trial
        again = layer_time(ws, xs, cfgs)
        ti = graph_time(layer_fns(ws, "torch_int4", xs), reps=10, iters=15)
        print(f"M={m:<3d} default {base:6.1f} us | tuned {best:6.1f} (re-timed {again:6.1f}) | torch int4 {ti:6.1f} | "
              + " ".join(f"{d['name']}={c}" for d, c in zip(ws, cfgs)), flush=True)


if __name__ == "__main__":
    main()
