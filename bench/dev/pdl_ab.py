"""A/B of the W4A16 launch options on the GPU (specq.kernels.w4a16.OPTIONS): plain, bulk L2 prefetch of each
program's weights, programmatic dependent launch (PDL), both. First a race check: a chain of dependent matmuls
(each one's output is the next one's input) must give bit-identical results with the options on, eagerly and
replayed from a CUDA graph. Then Llama-3-8B / 70B layers (qkv, o, gate_up, down), default configs, whole layer
in one graph (10 layers per replay), torch int4 in the same run.   PYTHONPATH=$PWD python bench/dev/pdl_ab.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time, layer_fns  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels.w4a16 import default_config, prepare_w4a16, set_launch_options, w4a16_linear  # noqa: E402

# name: (prefetch, pdl, tma, stages override or None)
VARIANTS = {"plain": (False, False, False, None), "pdl": (False, True, False, None),
            "tma": (False, False, True, None), "tma-s3": (False, False, True, 3), "tma-s4": (False, False, True, 4),
            "tma+pdl": (False, True, True, None), "tma-s4+pdl": (False, True, True, 4)}
RACE = ("plain", "tma", "tma+pdl", "tma-s4+pdl")


def cfg_for(m, d, stages):
    if stages is None:
        return None
    c = list(default_config(m, d["N"], d["K"]))
    c[5] = stages
    return tuple(c)


def chain(ws, x, stages=None):
    for w in ws:
        x = w4a16_linear(x, w, cfg=cfg_for(x.shape[0], {"N": w.N, "K": w.K}, stages))
    return x


@torch.inference_mode()
def race_check(g):
    # 4096 -> 14336 -> 4096 -> 4096 -> 14336 -> 4096 (up, down, o, up, down)
    shapes = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 14336), (14336, 4096)]
    ws = [prepare_w4a16(*ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g), 128) for K, N in shapes]
    for m in (1, 4, 16, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        set_launch_options(False, False, False)
        want = chain(ws, x)
        for name in RACE:
            pf, pdl, tma, st = VARIANTS[name]
            set_launch_options(pf, pdl, tma)
            eager = chain(ws, x, st)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain(ws, x, st)
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                out = chain(ws, x, st)
            same = []
            for _ in range(5):
                out.zero_()
                gr.replay()
                torch.cuda.synchronize()
                same.append(torch.equal(out, want))
            ok = torch.equal(eager, want) and all(same) and bool(torch.isfinite(want).all())
            print(f"race check M={m:<3d} {name:8s} eager equal {torch.equal(eager, want)}  graph equal {same}"
                  f"  {'ok' if ok else 'FAIL'}", flush=True)
            assert ok
    set_launch_options(False, False, False)


@torch.inference_mode()
def main():
    g = torch.Generator().manual_seed(1)
    race_check(g)
    for model in ("llama3-8b", "llama3-70b"):
        ws = []
        for name, K, N in MODELS[model]:
            q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
            wu8 = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
            ws.append(dict(name=name, K=K, N=N, raw=(q, s, z), w=prepare_w4a16(q, s, z, 128),
                           int4pack=torch.ops.aten._convert_weight_to_int4pack(wu8, 8),
                           int4sz=(torch.rand(K // 128, N, 2, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)))
        for m in (1, 2, 4, 8, 16, 32, 64, 128):
            xs = {d["K"]: torch.randn(m, d["K"], device="cuda", dtype=torch.bfloat16) for d in ws}
            t = {}
            for name, (pf, pdl, tma, st) in VARIANTS.items():
                set_launch_options(pf, pdl, tma)
                for d in ws:
                    q, s, z = d["raw"]
                    r = xs[d["K"]].float() @ ref.dequant_w4(q, s, z).T
                    e = ((w4a16_linear(xs[d["K"]], d["w"], cfg=cfg_for(m, d, st)).float() - r).norm() / r.norm()).item()
                    assert e < 1e-2, (model, m, d["name"], name, e)
                t[name] = graph_time([lambda d=d: w4a16_linear(xs[d["K"]], d["w"], cfg=cfg_for(m, d, st)) for d in ws])
            set_launch_options(False, False, False)
            ti = graph_time(layer_fns(ws, "torch_int4", xs))
            print(f"{model:10s} M={m:<3d} " + "  ".join(f"{k} {v:6.1f}" for k, v in t.items())
                  + f"  | torch int4 {ti:6.1f} us", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
