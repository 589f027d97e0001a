"""EXPERIMENT, not measured yet: the greedy step's argmax over 128256 fp32 logits took 27 us in ATen's reduce kernel
(one launch, decode_variants.txt session 9; ~1.2% of an 8B W4A16 step). Candidates, each checked for the same index
first, then timed as CUDA-graph replays:
  aten       logits.argmax(-1)
  compiled   torch.compile'd argmax (inductor's split reduction)
  max        torch.max(logits, -1).indices
PYTHONPATH=$PWD python3 bench/dev/argmax_ab.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.kernels import graph_time  # noqa: E402


@torch.no_grad()
def main():
    V = 128256
    logits = torch.randn(1, V, device="cuda")
    logits[0, 77777] = 9.0
    comp = torch.compile(lambda lg: lg.argmax(-1), dynamic=False)
    fns = {"aten": lambda: logits.argmax(-1), "compiled": lambda: comp(logits),
           "max": lambda: torch.max(logits, -1).indices}
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, argmax over [1, {V}] fp32")
    for name, f in fns.items():
        assert int(f()[0]) == 77777, name
        print(f"  {name:9s} {graph_time([f], reps=50):6.2f} us")


if __name__ == "__main__":
    main()
