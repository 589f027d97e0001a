"""A/B of qdec1 sources in one call: the w4mma + qdec1 layer (4 Linears, CUDA graphs over 4 Llama-3-8B layers, fresh
activations per replay, interleaved rounds, median per layer), timed like bench/qdec_overhead.py against the
uncompensated w4mma base of the same call.  PYTHONPATH=$PWD VARIANTS=old,new python bench/dev/qdec_ab.py
A variant "v" takes the CUDA sources of qdec1 and w4mma from specq.compensate._mma_v and specq.kernels._w4mma_v
(e.g. uncommitted copies of the previous files; their Python is not used) or, for "new", the modules as they are
("sep": the same with qdec1 as its own kernel, SPECQ_QDEC_INGRID=0); "v@noepi" etc.: variant v's sources with a
diagnostic QDIAG (DIAGS).
Checks each variant first (qdec_overhead.check_mma)."""
import importlib
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.qdec_overhead import check_mma, graph_time, w4_chain  # noqa: E402
from specq.compensate import mma  # noqa: E402
from specq.kernels import w4mma  # noqa: E402

NEW = (mma._SRC, w4mma._SMALL, w4mma._HELPERS)


DIAGS = {"nofetch": "#define QDIAG 1\n", "noqdec": "#define QDIAG 2\n", "noqi": "#define QDIAG 3\n",
         "noepi": "#define QDIAG 4\n"}


def use(variant):
    """variant: new | sep | a diagnostic (DIAGS) | v (the _mma_v / _w4mma_v sources) | v@diagnostic"""
    mma.INGRID = variant != "sep"          # "sep": the sources as they are, qdec1 as its own kernel before w4mma
    variant, _, diag = variant.partition("@")
    mma.DIAG = DIAGS.get(diag or variant, "")
    if variant in ("new", "sep") or variant in DIAGS:
        mma._SRC, w4mma._SMALL, w4mma._HELPERS = NEW
    else:
        m = importlib.import_module(f"specq.compensate._mma_{variant}")
        k = importlib.import_module(f"specq.kernels._w4mma_{variant}")
        mma._SRC, w4mma._SMALL, w4mma._HELPERS = m._SRC, k._SMALL, k._HELPERS
    for key in [key for key in w4mma._KERNELS if key[0] in ("qdec1", "w4mma")]:
        del w4mma._KERNELS[key]


@torch.inference_mode()
def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    variants = os.environ.get("VARIANTS", "old,new").split(",")
    ks = [float(k) for k in os.environ.get("KS", "0.005,0.01").split(",")]
    print(torch.cuda.get_device_name(), torch.__version__)
    for v in variants:
        use(v)
        if v.partition("@")[2] or v in DIAGS:            # diagnostics: wrong sums by design
            continue
        r = check_mma(dev, lambda s: None)
        bad = {k: c for k, c in r.items() if c == "not usable" or c["partials_rel_err"] != 0.0
               or not c.get("equal_to_separate", True)
               or c["graph_equal_eager"] != "10/10" or c["max_rel_err"] > 1e-2}
        print(f"check {v}: {len(r) - len(bad)}/{len(r)} exact partials, graph == eager, in-grid == apart; in-grid "
              f"used in {sum(bool(c.get('ingrid')) for c in r.values() if isinstance(c, dict))}"
              + (f"; BAD {bad}" if bad else ""))
    layers, step, set_k, xs_flat, pool = w4_chain(dev, 4)
    base, q = [], {(v, k): [] for v in variants for k in ks}
    for _ in range(3):
        set_k(0)
        base.append(graph_time(step, xs_flat, pool, 100) / 4)
        for v in variants:
            use(v)
            for k in ks:
                set_k(k)
                q[(v, k)].append(graph_time(step, xs_flat, pool, 100) / 4)
    b = statistics.median(base)
    print(f"w4mma base {b:.1f} us per layer (rounds {', '.join(f'{t:.1f}' for t in base)})")
    for (v, k), ts in q.items():
        t = statistics.median(ts)
        print(f"{v:8s} k={k}: {t:.1f} us per layer, +{100 * (t / b - 1):.1f}%  (rounds {', '.join(f'{x:.1f}' for x in ts)})")


if __name__ == "__main__":
    main()
