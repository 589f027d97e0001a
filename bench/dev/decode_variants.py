"""Dev tool (GPU): per-token decode time of a random-weight SmolLM2-shaped model for decode-path variants.

    PYTHONPATH=$PWD python3 bench/dev/decode_variants.py [--variants a,b,...]

Timing only (weights are random, so tokens are meaningless); greedy, 256 steps, median of 3.
"""
import argparse
import time

import torch

import specq.models.llama as L
from specq.generate import Decoder
from specq.models.config import ModelConfig

CFG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
           rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def run(model, small_m, compile, n=256, reps=3, prompt=51, profile=False):
    if small_m:
        raise SystemExit("the grouped-attention variant measured slower on the H100 and was removed")
    torch._dynamo.reset()
    ts = []
    for r in range(reps + 1):
        dec = Decoder(model, prompt + n + 1, compile=compile)
        dec.prefill(torch.randint(0, 49152, (prompt,), device="cuda"))
        tok = 1
        torch.cuda.synchronize(); t0 = time.perf_counter()
        tok = dec.step_greedy(tok)
        for _ in range(n - 1):
            tok = dec.step_greedy(None)
        torch.cuda.synchronize(); dt = time.perf_counter() - t0
        if r:
            ts.append(dt)
    if profile:  # the compiled step without the graph: kernel names, counts and durations
        from torch.profiler import ProfilerActivity, profile as prof
        dec = Decoder(model, prompt + 64, compile=compile, cuda_graph=False)
        dec.prefill(torch.randint(0, 49152, (prompt,), device="cuda"))
        for _ in range(5):
            dec.step(1)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(10):
                dec.step(1)
            torch.cuda.synchronize()
        print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    ts.sort()
    return ts[len(ts) // 2] / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="sdpa-bool-graph,sdpa-bool-compile,sdpa-bool-cdt")
    ap.add_argument("--profile", default="", help="variant to profile (kernel table)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = L.Transformer(ModelConfig(**CFG)).to(device="cuda", dtype=torch.bfloat16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    import torch._inductor.config as ic
    rows = []
    for v in a.variants.split(","):
        attn, mb, kind = v.split("-")
        small = 64 if attn == "grouped" else 0
        if mb != "bool":
            print("only bool masks now (the additive-bias variant measured slower and was removed)"); continue
        ic.coordinate_descent_tuning = kind in ("cdt", "maxat")  # Decoder turns it on for any compile
        comp = {"graph": False, "compile": True, "cdt": True, "maxat": "max-autotune-no-cudagraphs"}[kind]
        t0 = time.time()
        try:
            us = run(model, small, comp, profile=(v == a.profile))
        except Exception as e:
            print(v, "FAILED", type(e).__name__, str(e).splitlines()[0][:200]); continue
        rows.append((v, us))
        print(f"{v:<20} {us:8.1f} us/token  {1e6 / us:7.1f} tok/s   (variant took {time.time() - t0:.0f}s)", flush=True)
    print("\nvariant               us/token   tok/s")
    for v, us in rows:
        print(f"{v:<20} {us:8.1f}   {1e6 / us:7.1f}")


if __name__ == "__main__":
    main()
