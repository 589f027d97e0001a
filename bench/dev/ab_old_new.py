"""A/B of two versions of the W4A16 kernel module on the GPU (specq/kernels/_w4a16_old.py = the previous commit's
w4a16.py, copied there for the run) with default configs, whole layer in one CUDA graph (10 layers per replay),
correctness of both against the reference first, torch int4 in the same run.
git show REV:specq/kernels/w4a16.py > specq/kernels/_w4a16_old.py
PYTHONPATH=$PWD python bench/dev/ab_old_new.py [llama3-8b] [llama3-70b]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time, layer_fns  # noqa: E402
from specq.kernels import _w4a16_old as OLD  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels import w4a16 as NEW  # noqa: E402


@torch.inference_mode()
def main():
    g = torch.Generator().manual_seed(1)
    models = sys.argv[1:] or ["llama3-8b", "llama3-70b"]
    for model in models:
        ws = []
        for name, K, N in MODELS[model]:
            q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
            wu8 = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
            ws.append(dict(name=name, K=K, N=N, raw=(q, s, z), old=OLD.prepare_w4a16(q, s, z, 128),
                           new=NEW.prepare_w4a16(q, s, z, 128),
                           int4pack=torch.ops.aten._convert_weight_to_int4pack(wu8, 8),
                           int4sz=(torch.rand(K // 128, N, 2, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)))
        for m in (1, 2, 4, 8, 16, 32, 64, 128):
            xs = {d["K"]: torch.randn(m, d["K"], device="cuda", dtype=torch.bfloat16) for d in ws}
            for d in ws:
                q, s, z = d["raw"]
                r = xs[d["K"]].float() @ ref.dequant_w4(q, s, z).T
                for key, mod in (("old", OLD), ("new", NEW)):
                    e = ((mod.w4a16_linear(xs[d["K"]], d[key]).float() - r).norm() / r.norm()).item()
                    assert e < 1e-2, (model, m, d["name"], key, e)
            t = {key: graph_time([lambda d=d, key=key, mod=mod: mod.w4a16_linear(xs[d["K"]], d[key]) for d in ws])
                 for key, mod in (("old", OLD), ("new", NEW))}
            ti = graph_time(layer_fns(ws, "torch_int4", xs))
            print(f"{model:10s} M={m:<3d} old {t['old']:6.1f} us  new {t['new']:6.1f} us  "
                  f"({100 * (t['new'] / t['old'] - 1):+.1f}%)  torch int4 {ti:6.1f}", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
