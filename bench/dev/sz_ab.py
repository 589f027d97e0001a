"""A/B of the W4A16 kernel's scale/zero load modes (specq.kernels.w4a16.SZ_MODE: 0 = two 2-byte loads per block in
the loop, the default; 1 = one packed int32 load; 2 = the split's packed tile loaded before the loop; see
bench/dev/w4_sass.py for their SASS), default configs otherwise, whole layer in one CUDA graph (10 layers per
replay), every mode checked against the reference first, torch int4 in the same run.
PYTHONPATH=$PWD python bench/dev/sz_ab.py [llama3-8b] [llama3-70b]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time, layer_fns, make_weights  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4a16 as W  # noqa: E402

MODES = (0, 1, 2)


def run(x, w, mode):
    c = W.default_config(x.shape[0], w.N, w.K)
    return W.w4a16_linear(x, w, cfg=tuple(c[:7]) + (mode,))


@torch.inference_mode()
def main():
    for model in sys.argv[1:] or ["llama3-8b", "llama3-70b"]:
        ws = make_weights(MODELS[model], "cuda")       # bench/kernels.py's layer (torch int4 peer included)
        for d in ws:
            d["raw"] = d["w4a16_raw"]
            d["w"] = W.prepare_w4a16(*d["raw"], 128, packed=True)
        for m in (1, 2, 4, 8, 16, 32, 64):
            xs = {d["K"]: torch.randn(m, d["K"], device="cuda", dtype=torch.bfloat16) for d in ws}
            for d in ws:
                q, s, z = d["raw"]
                r = xs[d["K"]].float() @ ref.dequant_w4(q, s, z).T
                for mode in MODES:
                    e = ((run(xs[d["K"]], d["w"], mode).float() - r).norm() / r.norm()).item()
                    assert e < 1e-2, (model, m, d["name"], mode, e)
            t = {mode: graph_time([lambda d=d, mode=mode: run(xs[d["K"]], d["w"], mode) for d in ws]) for mode in MODES}
            ti = graph_time(layer_fns(ws, "torch_int4", xs))
            print(f"{model:10s} M={m:<3d} " + "  ".join(f"sz{k} {v:6.1f} us" for k, v in t.items()) +
                  f"  ({100 * (t[1] / t[0] - 1):+.1f}%, {100 * (t[2] / t[0] - 1):+.1f}%)  torch int4 {ti:6.1f}",
                  flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
