"""WikiText-2 perplexity of SmolLM2-135M-Instruct, weight-only 3/4 bit, without and with QDEC.

    nohup python bench/qdec_ppl.py --out bench/results/cpu/qdec_smollm2.json > /tmp/qdec_ppl.log 2>&1 &

Rows {bits, method, k_fraction (selected / input channels; 0 = no compensation), selector, ppl}.
Evaluated on the first --tokens tokens of the test split (windows of --ctx): 4096 by default because
the 2 shared CPU cores evaluate ~2k tokens a minute; every row uses the same tokens (paired).
Quantizers: RTN and the --methods (gptq, awq; group size 64: SmolLM2's 576 channels are not a
multiple of 128); the best of --methods (at k=0) is the one compensated. 3 bit: every --k; 4 bit: one. Residuals: 4 bit, per output channel.
The JSON is rewritten after every row, so a cut run keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specq.compensate import compensate_model, keep_fp_weights, set_k_fraction  # noqa: E402
from specq.models import load_model  # noqa: E402
from specq.quant import quantize_model  # noqa: E402
from specq.quant.calib import calib_tokens  # noqa: E402
from specq.quant.ppl import eval_text, perplexity  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--methods", default="gptq")
    ap.add_argument("--k", default="0.02,0.01,0.05")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--selector", default="approx")
    ap.add_argument("--exact-at", type=float, default=0.0, help="also run the exact selector at this k")
    ap.add_argument("--out", default="bench/results/cpu/qdec_smollm2.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    fp_model, tok = load_model(a.model)
    ids = torch.tensor(tok.encode(eval_text("wikitext2")), dtype=torch.long)[:a.tokens + 1]
    qcal = calib_tokens(tok, "wikitext2", n=8, seqlen=256, seed=0)     # quantizer calibration
    scal = calib_tokens(tok, "wikitext2", n=8, seqlen=256, seed=1)      # bucket thresholds
    res = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32 = the 'fp' reference)",
               data="wikitext2 test", tokens=0, ctx=a.ctx, group_size=a.group_size,
               residual="4-bit symmetric per output channel, MSE clip search, transposed [K, N]",
               selector_calibration="wikitext2 valid, 8 x 256 tokens", rows=[], fp_ppl=None,
               command="python " + " ".join(sys.argv), date=datetime.date.today().isoformat(),
               machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(res, indent=1) + "\n")

    def ppl(m):
        t0 = time.time()
        p, n = perplexity(m, ids, ctx=a.ctx, progress=False)
        res["tokens"] = n
        print(f"   ppl {p:.3f} ({n} tokens, {time.time() - t0:.0f}s)", flush=True)
        return p

    print("fp", flush=True)
    res["fp_ppl"] = ppl(fp_model)
    save()
    ks = [float(k) for k in a.k.split(",") if k]

    def quant(bits, method):
        m = copy.deepcopy(fp_model)
        t0 = time.time()
        with keep_fp_weights() as fpw:
            quantize_model(m, f"w{bits}a16", method, group_size=a.group_size,
                           calib=None if method == "rtn" else qcal, progress=False)
        print(f"w{bits} {method} quantized in {time.time() - t0:.0f}s", flush=True)
        p = ppl(m)
        res["rows"].append(dict(bits=bits, method=method, k_fraction=0.0, selector=None, ppl=p))
        save()
        return p, m, fpw

    def sweep(bits, method, m, fpw, kl):
        compensate_model(m, fpw, k_fraction=kl[0], selector=a.selector, calib=scal)
        runs = [(k, a.selector) for k in kl]
        if a.exact_at and a.selector != "exact":
            runs.append((a.exact_at, "exact"))
        for k, sel in runs:
            for _, cl in m.named_modules():
                if hasattr(cl, "residual"):
                    cl.selector = sel
            set_k_fraction(m, k)
            kf = [cl.k_fraction for _, cl in m.named_modules() if hasattr(cl, "residual")]
            print(f"w{bits} {method} k={k} ({sel}; realised mean {sum(kf) / len(kf):.4f})", flush=True)
            p = ppl(m)
            res["rows"].append(dict(bits=bits, method=method, k_fraction=k,
                                    k_fraction_realised=round(sum(kf) / len(kf), 5), selector=sel, ppl=p))
            save()

    for bits in [int(b) for b in a.bits.split(",")]:
        kl = ks if bits == 3 else ks[:1]               # 4 bit: the first k only (CPU time)
        _, m, fpw = quant(bits, "rtn")
        sweep(bits, "rtn", m, fpw, kl)
        del m, fpw
        best = None
        for method in [x for x in a.methods.split(",") if x]:
            p, m, fpw = quant(bits, method)
            if best is None or p < best[0]:
                best = (p, method, m, fpw)
            del m, fpw
        if best:
            sweep(bits, best[1], best[2], best[3], kl)
            best = None
    # gap recovery summary (3 bit, best per method at k <= 0.02)
    summ = []
    for r in res["rows"]:
        if r["k_fraction"] > 0:
            b0 = next(x["ppl"] for x in res["rows"] if x["bits"] == r["bits"] and x["method"] == r["method"]
                      and x["k_fraction"] == 0)
            gap = b0 - res["fp_ppl"]
            summ.append(dict(bits=r["bits"], method=r["method"], k_fraction=r["k_fraction"], selector=r["selector"],
                             gap_recovered=round((b0 - r["ppl"]) / gap, 4) if gap > 0 else None))
    res["gap_recovered"] = summ
    save()
    print(json.dumps(summ, indent=1))


if __name__ == "__main__":
    main()
