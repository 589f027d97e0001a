"""Where a decode step's time goes: Llama-3-8B shape, random weights, one format, specq's Decoder (CUDA graph;
--compile: the torch.compile'd step), 20 steps under torch.profiler; GPU time per kernel name, largest first.
PYTHONPATH=$PWD python bench/dev/decode_profile.py [--fmt w4a16] [--compile [--regional]] [--quant-head] [--shape llama3-8b]
(SPECQ_NO_FUSE=1: no fused norm / residual in the W4A16 kernel). --tokens FILE writes the 57 greedy tokens (the first from the prefill) after the
prompt (a seeded prompt), so two runs under different switches (SPECQ_PDL=0 / 1) can be compared token for token."""
import argparse
import collections
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.bench.randmodel import build_random, config  # noqa: E402
from specq.generate import Decoder  # noqa: E402


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="w4a16")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--regional", action="store_true", help="with --compile: Transformer.compile_blocks")
    ap.add_argument("--quant-head", action="store_true", help="lm_head in W4A16 too (randmodel quant_head)")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--tokens", default=None, help="write the greedy tokens (one line) to this file")
    a = ap.parse_args()
    model = build_random(config(a.shape), a.fmt, "cuda", torch.bfloat16, quant_head=a.quant_head)
    tc = time.perf_counter()
    dec = Decoder(model, 512, compile=a.compile, regional=a.regional)
    g = torch.Generator().manual_seed(1)
    logits = dec.prefill(torch.randint(0, model.cfg.vocab_size, (128,), generator=g))
    toks = [int(logits.argmax())]
    toks.append(dec.step_greedy(toks[0]))
    for _ in range(5):
        toks.append(dec.step_greedy(None))
    torch.cuda.synchronize()
    print(f"compile + capture + first steps: {time.perf_counter() - tc:.1f} s")
    t0 = time.perf_counter()
    for _ in range(50):
        toks.append(dec.step_greedy(None))
    torch.cuda.synchronize()
    if a.tokens:
        Path(a.tokens).write_text(" ".join(map(str, toks)) + "\n")
    print(f"{a.shape} {a.fmt} compile={a.compile} regional={a.regional} quant_head={a.quant_head} "
          f"fuse={os.environ.get('SPECQ_NO_FUSE', '0') != '1'}: {50 / (time.perf_counter() - t0):.1f} tok/s")
    if not a.no_table:
        print(kernel_table(lambda: dec.step_greedy(None), 20, "step"))


def kernel_table(fn, calls: int, what: str = "call", top: int = 15, width: int = 90) -> str:
    """Run fn() `calls` times under torch.profiler: GPU time per kernel name per call, largest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    tot, cnt = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name[:width]] += e.time_range.elapsed_us() / calls
            cnt[e.name[:width]] += 1 / calls
    lines = [f"GPU kernel time per {what} {sum(tot.values()):.0f} us ({sum(cnt.values()):.0f} kernels)"]
    lines += [f"  {us:8.1f} us  {cnt[name]:5.0f}x  {name}" for name, us in tot.most_common(top)]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
