"""Timeline of one compensated Llama-3-8B layer (4 Linears, specq W4A16 base, approx selector) replayed from a
CUDA graph: every kernel's start and end relative to the replay's first kernel (torch.profiler), to see which part
of the side-stream compensation sits on the critical path.   PYTHONPATH=$PWD python bench/dev/qdec_profile.py [k] [prologue]
BASE=w3: the 3-bit WQLinear on the W3A16 kernel instead. QDIAG=1 / 2: in-grid compensation CTAs without the fetch /
without selection and fetch (specq.compensate.mma.DIAG); INGRID=0: qdec1 as its own kernel."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import SHAPES, SpecqW4, acts, rand_residual, wq_base  # noqa: E402
from specq.compensate import CompensatedLinear  # noqa: E402
from specq.compensate import select as SEL  # noqa: E402
from specq.compensate.tune import graph_of  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear  # noqa: E402


@torch.inference_mode()
def main():
    kf = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "prologue" else 0.005
    prologue = "prologue" in sys.argv    # one elementwise kernel before the first Linear (as a norm would be)
    from specq.compensate import mma
    if os.environ.get("QDIAG"):
        mma.DIAG = f"#define QDIAG {int(os.environ['QDIAG'])}\n"
    mma.INGRID = os.environ.get("INGRID", "1") != "0"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    mods, xs = {}, {}
    for p, (K, N) in SHAPES.items():
        ch = torch.exp(torch.randn(K, device=dev))
        stats = SEL.calib_stats(acts(256, K, ch, dev).float().cpu())
        base = (wq_base(K, N, 3, dev) if os.environ.get("BASE") == "w3"
                else SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear))
        mods[p] = CompensatedLinear(base, rand_residual(K, N), k_chunk=0, selector="approx", stats=stats)
        xs[p] = acts(1, K, ch, dev)
    for k in (0.0, kf):
        for cl in mods.values():
            cl.set_k(SEL.k_chunk_for(cl.in_features, k))

        def step():
            if prologue:
                xs["qkv_proj"].mul_(1.0)
            for p, cl in mods.items():
                cl(xs[p])
        g = graph_of(step, warm=3)
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g.replay()
                torch.cuda.synchronize()
        evs = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                     key=lambda e: e.time_range.start)
        n = len(evs) // 5
        last = evs[-n:]
        t0 = last[0].time_range.start
        print(f"== k_fraction {k}: {n} kernels per replay, replay span {last[-1].time_range.end - t0:.1f} us")
        for e in last:
            print(f"  {e.time_range.start - t0:7.1f} .. {e.time_range.end - t0:7.1f}  ({e.time_range.elapsed_us():5.1f})  "
                  f"{e.name[:60]}")


if __name__ == "__main__":
    main()
