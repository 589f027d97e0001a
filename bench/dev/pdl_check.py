"""w4mma under programmatic dependent launch: a chain of dependent matmuls (each one's input is the previous one's
output, with the fused residual) captured in a CUDA graph (PDL launches) must equal the same chain run eagerly
(plain launches of the same kernels), bit for bit.   PYTHONPATH=$PWD python3 bench/dev/pdl_check.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.kernels import pdl, ref, w4mma  # noqa: E402


@torch.no_grad()
def main():
    g = torch.Generator().manual_seed(0)
    D = 4096
    ws = [w4mma.prepare_mma(*ref.random_w4a16(D, D, 128, True, torch.bfloat16, "cuda", g), 128, torch.bfloat16)
          for _ in range(8)]
    x = (torch.randn(1, D, generator=g) * 0.05).to("cuda", torch.bfloat16)

    def chain():
        h = x
        for w in ws:
            h = w4mma.w4mma_linear(h, w, res=h) * 0.5
        return h

    want = chain()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        got = chain()
    bad = 0
    for _ in range(20):
        gr.replay()
        torch.cuda.synchronize()
        bad += not torch.equal(got, want)
    print(f"pdl enabled {pdl.enabled('cuda')}: graph replays equal to eager: {20 - bad}/20, finite "
          f"{bool(torch.isfinite(got).all())}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
