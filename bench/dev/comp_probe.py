"""Where does the fused W4A16 + compensation launch spend its time? (GPU experiment for issue QDEC)

    PYTHONPATH=$PWD python bench/dev/comp_probe.py

Llama-3-8B gate_up (K 4096 -> N 28672) and down (14336 -> 4096), one token, k_chunk 5 (k = 0.005 of the
channels): CUDA-graph time (20 launches per replay, fresh activations copied in before each replay) of the
plain kernel, the compensated launch (comp kernel on a side stream + the GEMV, joined by the split-K counters)
and the older side-stream path (select + fetch kernels, then an add).
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.compensate import kernel as KK, select as SEL, CompensatedLinear, Residual  # noqa: E402
from specq.kernels import w4a16 as W  # noqa: E402


def gtime(fn, x, pool, reps=20, iters=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for i in range(iters):
        x.copy_(pool[i % len(pool)])
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(ts)


class Base(torch.nn.Module):
    def __init__(self, K, N):
        super().__init__()
        self.in_features, self.out_features = K, N
        q = torch.randint(-2**31, 2**31 - 1, (N, K // 8), dtype=torch.int32, device="cuda")
        self.scales = torch.empty(N, K // 128, dtype=torch.bfloat16, device="cuda").uniform_(0.001, 0.01)
        self.w = W.prepare_w4a16(q, self.scales, torch.full_like(self.scales, 8.0), 128, torch.bfloat16)

    def w4a16_weight(self, dtype):
        return self.w

    def forward(self, x):
        return W.w4a16_linear(x, self.w)


@torch.inference_mode()
def main():
    torch.manual_seed(0)
    for name, K, N in (("gate_up", 4096, 28672), ("down", 14336, 4096), ("qkv", 4096, 6144)):
        base = Base(K, N)
        res = Residual(codes=torch.randint(-2**31, 2**31 - 1, (K, N // 8), dtype=torch.int32).pin_memory(),
                       scales=torch.rand(N) * 1e-3 + 1e-4)
        ch = torch.exp(torch.randn(K, device="cuda"))
        stats = SEL.calib_stats((torch.randn(256, K, device="cuda") * ch).float().cpu())
        cl = CompensatedLinear(base, res, k_chunk=5, selector="approx", stats=stats)
        pool = (torch.randn(16, 1, K, device="cuda") * ch).to(torch.bfloat16)
        x = pool[0].clone()
        out = [f"{name:8s}"]
        t0 = gtime(lambda: base(x), x, pool)
        out.append(f"base {t0:6.1f} us")
        for kc in (3, 5, 10):
            cl.set_k(kc)
            t = gtime(lambda: KK.fused(cl, x), x, pool)
            out.append(f"fused kc{kc} {t:6.1f} us (+{100 * (t / t0 - 1):.1f}%)")
        cl.set_k(5)
        KK.FUSED = False
        t = gtime(lambda: cl(x), x, pool)
        KK.FUSED = True
        out.append(f"side {t:6.1f} us")
        print(" | ".join(out), flush=True)


if __name__ == "__main__":
    main()
