"""Where a verification forward's time goes: a model shape (random weights, one format), the e2e Verifier (CUDA
graph of the target's forward over a causal chain of M tokens at cache slot L), wall time per call for several
M, then torch.profiler GPU time per kernel name for the M given by --prof; --sdpa: attention by torch's SDPA
instead of specq's kernel.   PYTHONPATH=$PWD python bench/dev/verify_profile.py [--fmt w4a16] [--sdpa]"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.dev.decode_profile import kernel_table  # noqa: E402
from specq.bench.e2e_units import Graphs, Verifier, chain_parents  # noqa: E402
from specq.bench.randmodel import build_random, config  # noqa: E402
from specq.models import llama  # noqa: E402


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="w4a16")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--S", type=int, default=512)
    ap.add_argument("--sdpa", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd forward (dynamic M)")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    ap.add_argument("--prof", default="1,2")
    a = ap.parse_args()
    model = build_random(config(a.shape), a.fmt, "cuda", torch.bfloat16)
    model.setup_cache(a.S)
    for layer in model.layers:
        layer.self_attn.cache.k.normal_()
        layer.self_attn.cache.v.normal_()
    L = 96
    modes = [(False, False)] + ([(True, False)] if a.sdpa else []) + ([(False, True)] if a.compile else [])
    for sd, comp in modes:
        llama.KERNEL_MAX_M = 0 if sd else 64
        g = Graphs("cuda")                   # fresh graphs and pool per mode
        ver = Verifier(model, a.S, g, "T", compile=comp)
        t0 = time.perf_counter()
        ver.run(chain_parents(1), L)
        ver.run(chain_parents(3), L)
        print(f"first calls (M=1, 3) {time.perf_counter() - t0:.1f} s", flush=True)
        res = {M: g.time(lambda M=M: ver.run(chain_parents(M), L), 10, wall=True) * 1e3 for M in map(int, a.ms.split(","))}
        print(f"{a.shape} {a.fmt} attention={'sdpa' if sd else 'kernel'} compile={comp}: T(M) ms " +
              " ".join(f"{M}:{t:.3f}" for M, t in res.items()) + f" | T(2)/T(1) {res.get(2, 0) / res[1]:.3f}", flush=True)
        for M in map(int, a.prof.split(",")):
            print(f"  M={M}: " + kernel_table(lambda: ver.run(chain_parents(M), L), 10, top=14, width=80))

if __name__ == "__main__":
    main()
