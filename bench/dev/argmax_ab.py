"""A/B of the greedy step's argmax over 128256 fp32 logits: 27 us in ATen's reduce kernel (one launch,
decode_variants.txt session 9; ~1.2% of an 8B W4A16 step). Measured in session 10 on the H100: aten 26.80 us,
compiled 22.93, max 26.48, specq 3.23 (now the greedy step's argmax). Candidates, each checked for the same index
first, then timed as CUDA-graph replays (specq's kernel is first checked bit-equal to aten on GPU: ties, NaN, -inf,
1..64 rows, repeated calls and graph replays over changed logits):
  aten       logits.argmax(-1)
  compiled   torch.compile'd argmax (inductor's split reduction)
  max        torch.max(logits, -1).indices
  specq      specq.kernels.argmax.argmax (one Triton launch: per-chunk partials, the last program reduces them)
PYTHONPATH=$PWD python3 bench/dev/argmax_ab.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.kernels import graph_time  # noqa: E402
from specq.kernels.argmax import argmax  # noqa: E402


@torch.no_grad()
def check_specq(V):
    """specq's argmax equals aten's on the GPU (the interpreter cannot test the cross-program atomics)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for R in (1, 2, 64):
        x = torch.randn(R, V, device="cuda", generator=g)
        x[0, [5000, 90000]] = 20.0                         # a tie: the first index
        x[-1, [100000, 7]] = float("nan")                  # NaN is the max: the first NaN
        if R > 1:
            x[1] = float("-inf") if R == 2 else 0.25       # all -inf / all equal: index 0
        for _ in range(3):
            assert torch.equal(argmax(x), x.argmax(-1)), R
    x = torch.randn(1, V, device="cuda", generator=g)
    argmax(x)                                              # compiled, counters made before the capture
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        out = argmax(x)
    for i in range(20):
        x.normal_(generator=g)
        x[0, (i * 6007) % V] = 9.0
        gr.replay()
        assert int(out[0]) == (i * 6007) % V, i


@torch.no_grad()
def main():
    V = 128256
    logits = torch.randn(1, V, device="cuda")
    logits[0, 77777] = 9.0
    comp = torch.compile(lambda lg: lg.argmax(-1), dynamic=False)
    fns = {"aten": lambda: logits.argmax(-1), "compiled": lambda: comp(logits),
           "max": lambda: torch.max(logits, -1).indices, "specq": lambda: argmax(logits)}
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, argmax over [1, {V}] fp32")
    check_specq(V)
    for name, f in fns.items():
        assert int(f()[0]) == 77777, name
        print(f"  {name:9s} {graph_time([f], reps=50):6.2f} us")


if __name__ == "__main__":
    main()
