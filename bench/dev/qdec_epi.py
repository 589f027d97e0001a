"""w4mma's compensation epilogues alone (partials ready beforehand, no qdec1): what QD costs by itself, and other
one-token configs for down_proj.  PYTHONPATH=$PWD python bench/dev/qdec_epi.py   (per launch, 20-launch graphs, PDL)
QI2: in-grid compensation CTAs (specq.compensate.mma.ingrid_shape) that only store zero partials; QI3: the same CTAs
exit at once and the GEMV's epilogue adds nothing (no polls): what the extra CTAs and the QI code cost by themselves."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.dev.qdec_floor import graph_us  # noqa: E402
from bench.qdec_overhead import SHAPES, SpecqW4, acts  # noqa: E402
from specq.compensate import mma  # noqa: E402
from specq.kernels import prepare_w4a16, w4a16_linear, w4mma  # noqa: E402


@torch.inference_mode()
def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        K, N = SHAPES[p]
        m = SpecqW4(K, N, dev, prepare_w4a16, w4a16_linear)
        w = m.w.mma
        x = acts(1, K, torch.ones(K, device=dev), dev)
        n = K // 1024
        ws = torch.randn(n, N, device=dev)
        sc = torch.rand(N, device=dev)
        y0 = w4mma.w4mma_linear(x, w)
        y1 = w4mma.w4mma_linear(x, w, comp=(ws, sc, n))
        ref = y0.float() + ws.sum(0) * sc
        err = ((y1.float() - ref).abs().max() / ref.abs().max()).item()
        row = [f"{p:13s} base {graph_us(lambda: w4mma.w4mma_linear(x, w)):6.2f}",
               f"QD (ready) {graph_us(lambda: w4mma.w4mma_linear(x, w, comp=(ws, sc, n))):6.2f} (err {err:.1e})"]
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        sh = mma.ingrid_shape(N, K, n, N // 8, sms, 5)        # in-grid CTAs that only store zero partials (QDIAG 2)
        if sh is not None:
            th, wpt, ch = sh
            qny = -(-(N // 8) // (th * wpt))
            qp = torch.full((n, N), -1, dtype=torch.int32, device=dev).view(torch.float32)
            thr = torch.zeros(n, 32, device=dev)
            for diag in (2, 3):
                qi = (-(-n // ch) * qny, qny, n, mma.defines(1024, 5, 32, None, wpt, th, ch, False)
                      + f"#define QDIAG {diag}\n", mma._SRC, thr, thr)
                row.append(f"QI{diag} {graph_us(lambda: w4mma.w4mma_linear(x, w, comp=(qp, sc, n, qi))):6.2f}")
        print(f"  default cfg {w4mma.default_config(1, N, K, sms)}")
        for c in ([w4mma.Cfg(1, 8, 4, 2, False, 3), w4mma.Cfg(1, 8, 8, 2, False, 3), w4mma.Cfg(1, 16, 8, 2, False, 2)]
                  if p == "down_proj" else []):
            row.append(f"{c.WARPS}w P{c.P} MINB{c.MINB}: {graph_us(lambda: w4mma.w4mma_linear(x, w, cfg=c)):6.2f} / QD "
                       f"{graph_us(lambda: w4mma.w4mma_linear(x, w, cfg=c, comp=(ws, sc, n))):6.2f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
