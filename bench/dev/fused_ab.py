"""A/B of the w4mma fused prologue / epilogue at Llama-3-8B layer shapes, one token: one decoder layer's four matmuls
per pass (4 layers of distinct random weights, so nothing is served from L2), timed as CUDA-graph replays.
  kernels   the four w4mma launches alone (the floor if the small ops around them were free)
  fused     qkv with the RMSNorm prologue, o with the residual, gate_up with the norm, SiLU*mul (compiled), down
            with the residual: five launches in all
  separate  the same kernels with the small ops as torch.compile'd kernels between them (norm, add + norm, SiLU*mul,
            add), as the compiled decode step runs them unfused
PYTHONPATH=$PWD python bench/dev/fused_ab.py [M]"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from bench.kernels import graph_time  # noqa: E402
from specq.kernels import ref, w4mma  # noqa: E402
from specq.models.llama import RMSNorm  # noqa: E402


def layer_weights(dev="cuda", dt=torch.bfloat16, n_layers: int = 4):
    """Llama-3-8B layers of distinct random int4 weights in w4mma's layout: (shapes {name: (K, N)}, D, I, layers)."""
    g = torch.Generator().manual_seed(0)
    shapes = {n: (K, N) for n, K, N in MODELS["llama3-8b"]}
    layers = []
    for _ in range(n_layers):
        w = {}
        for n, (K, N) in shapes.items():
            q, s, z = ref.random_w4a16(N, K, 128, True, dt, dev, g)
            w[n] = w4mma.prepare_mma(q, s, z, 128, dt)
        layers.append(w)
    return shapes, shapes["qkv"][0], shapes["down"][0], layers


@torch.no_grad()
def main():
    M = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    dev, dt = "cuda", torch.bfloat16
    shapes, D, I, layers = layer_weights(dev, dt)
    n1, n2 = RMSNorm(D, 1e-5).to(dev, dt), RMSNorm(D, 1e-5).to(dev, dt)
    h = torch.randn(M, D, device=dev, dtype=dt)
    attn = torch.randn(M, D, device=dev, dtype=dt)     # stands in for the attention output
    lin = w4mma.w4mma_linear
    norm_c = torch.compile(lambda x: n1(x))
    addnorm_c = torch.compile(lambda x, y: (x + y, n2(x + y)))
    silu_c = torch.compile(lambda gu: F.silu(gu[:, :I]) * gu[:, I:])
    add_c = torch.compile(lambda x, y: x + y)

    def kernels():
        for w in layers:
            lin(h, w["qkv"]); lin(attn, w["o"]); gu = lin(h, w["gate_up"]); lin(gu[:, :I].contiguous(), w["down"])

    def fused():
        for w in layers:
            lin(h, w["qkv"], norm_w=n1.weight, eps=1e-5)
            h1 = lin(attn, w["o"], res=h)
            gu = lin(h1, w["gate_up"], norm_w=n2.weight, eps=1e-5)
            lin(silu_c(gu), w["down"], res=h1)

    def only(what):                # one kind of fusion, the rest as in separate()
        def f():
            for w in layers:
                if "norm" in what:
                    lin(h, w["qkv"], norm_w=n1.weight, eps=1e-5)
                else:
                    lin(norm_c(h), w["qkv"])
                if "res" in what:
                    h1 = lin(attn, w["o"], res=h)
                    x2 = norm_c(h1)
                else:
                    h1, x2 = addnorm_c(h, lin(attn, w["o"]))
                gu = lin(h1, w["gate_up"], norm_w=n2.weight, eps=1e-5) if "norm" in what else lin(x2, w["gate_up"])
                a = silu_c(gu)
                lin(a, w["down"], res=h1) if "res" in what else add_c(h1, lin(a, w["down"]))
        return f

    def separate():
        for w in layers:
            lin(norm_c(h), w["qkv"])
            h1, x2 = addnorm_c(h, lin(attn, w["o"]))
            gu = lin(x2, w["gate_up"])
            add_c(h1, lin(silu_c(gu), w["down"]))

    runs = [("kernels", kernels), ("fused", fused), ("separate", separate), ("res only", only("res")),
            ("norm only", only("norm"))]
    for _, f in runs:      # compile + warm up
        f()
    torch.cuda.synchronize()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, llama3-8b layer, M={M}")
    for name, f in runs:
        print(f"  {name:9s} {graph_time([f], reps=5) / 4:7.1f} us per layer")


if __name__ == "__main__":
    main()
