"""Per-kernel view of one Llama-3-8B W4A16 layer at M tokens (default configs): kernel durations and the gaps
between them from torch.profiler (10 layers in one CUDA graph), plus each matmul's DRAM rate.
PYTHONPATH=$PWD python bench/dev/w4_profile.py [M ...]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.check_kernels import MODELS  # noqa: E402
from specq.kernels import ref  # noqa: E402
from specq.kernels.w4a16 import default_config, prepare_w4a16, w4a16_linear  # noqa: E402


@torch.inference_mode()
def main():
    ms = [int(a) for a in sys.argv[1:]] or [1, 16]
    g = torch.Generator().manual_seed(1)
    ws = []
    for name, K, N in MODELS["llama3-8b"]:
        q, s, z = ref.random_w4a16(N, K, 128, True, torch.bfloat16, "cuda", g)
        ws.append((name, K, N, prepare_w4a16(q, s, z, 128)))
    for m in ms:
        xs = {K: torch.randn(m, K, device="cuda", dtype=torch.bfloat16) for _, K, _, _ in ws}
        fns = [lambda K=K, w=w: w4a16_linear(xs[K], w) for _, K, _, w in ws]
        for f in fns:
            f()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for _ in range(10):
                for f in fns:
                    f()
        for _ in range(3):
            gr.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                gr.replay()
            torch.cuda.synchronize()
        evs = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                     key=lambda e: e.time_range.start)
        evs = [e for e in evs if "w4a16" in e.name]
        per = {nm: [] for nm, *_ in ws}
        gaps = []
        for i, e in enumerate(evs):
            per[ws[i % 4][0]].append(e.time_range.elapsed_us())
            if i:
                gaps.append(e.time_range.start - evs[i - 1].time_range.end)
        tot = 0.0
        for (nm, K, N, w), v in zip(ws, per.values()):
            v = sorted(v)[len(v) // 2]
            tot += v
            mb = (N * K / 2 + 4 * N * K / 128) / 1e6
            print(f"M={m:<3d} {nm:8s} [{K}x{N}] cfg {default_config(m, N, K)}  {v:6.1f} us  {mb / v:5.2f} TB/s  "
                  f"(floor at 3.35 TB/s {mb / 3.35:5.1f} us)")
        gaps.sort()
        print(f"M={m:<3d} sum of kernels {tot:6.1f} us; gap between kernels median {gaps[len(gaps) // 2]:.2f} us, "
              f"max {gaps[-1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
