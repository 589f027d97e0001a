"""WikiText-2 perplexity of SmolLM2-135M-Instruct, weight-only 3/4 bit, without and with QDEC.

    nohup python bench/qdec_ppl.py --out bench/results/cpu/qdec_smollm2.json > /tmp/qdec_ppl.log 2>&1 &
    python3 bench/qdec_ppl.py --model /root/models/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
        --tokens 0 --calib-samples 128 --calib-seqlen 2048 --out $OUT/qdec_smollm2.json     # GPU

Rows {bits, method, k_fraction (selected / input channels; 0 = no compensation), selector, ppl}.
Evaluated on the first --tokens tokens of the test split (0 = all; windows of --ctx); every row uses the
same tokens (paired). Per --bits: RTN, and each of --methods (gptq, awq) at k = 0; RTN and the best of
--methods (lowest ppl at k = 0) are then compensated at every --k. Residuals: 4 bit, per output channel.
GPTQ runs with --gptq-opts (specq.quant.quantize_model options). The JSON is rewritten after every row,
so a cut run keeps what it measured; --time-limit stops starting new rows after that many seconds.
Compensated rows use the reference math (use_kernel off; the same numbers the CUDA kernel computes).
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
from specq.compensate import compensate_model, compensated_modules, keep_fp_weights, set_k_fraction  # noqa: E402
from specq.models import load_model  # noqa: E402
from specq.quant import quantize_model  # noqa: E402
from specq.quant.calib import calib_tokens  # noqa: E402
from specq.quant.ppl import eval_text, perplexity  # noqa: E402

GPTQ_OPTS = '{"sym": false, "act_order": true, "clip": "hessian", "true_seq": true, "refit": true, "fp_target": true}'


class OutOfTime(Exception):
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tokens", type=int, default=4096, help="test tokens to score (0 = the whole test set)")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--gptq-opts", default=GPTQ_OPTS, help="JSON kwargs for quantize_model with method gptq")
    ap.add_argument("--k", default="0.01,0.02,0.05")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--selector", default="approx")
    ap.add_argument("--exact-at", type=float, default=0.0, help="also run the exact selector at this k")
    ap.add_argument("--time-limit", type=float, default=0.0, help="seconds; no new row starts after it (0 = none)")
    ap.add_argument("--out", default="bench/results/cpu/qdec_smollm2.json")
    a = ap.parse_args()
    t_start = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gopts = json.loads(a.gptq_opts)
    fp_model, tok = load_model(a.model, device=a.device)
    ids = torch.tensor(tok.encode(eval_text("wikitext2")), dtype=torch.long)
    ids = ids[:a.tokens + 1] if a.tokens else ids
    qcal = calib_tokens(tok, "wikitext2", n=a.calib_samples, seqlen=a.calib_seqlen, seed=0)   # quantizers
    scal = calib_tokens(tok, "wikitext2", n=8, seqlen=256, seed=1)                            # bucket thresholds
    dev = torch.device(a.device)
    machine = (f"{torch.cuda.get_device_name(dev)} (float32), torch {torch.__version__}" if dev.type == "cuda" else
               f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    res = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32 = the 'fp' reference)",
               data="wikitext2 test", tokens=0, ctx=a.ctx, group_size=a.group_size,
               calibration=f"WikiText-2 valid, {a.calib_samples} x {a.calib_seqlen} tokens (quantizers)",
               gptq_options=gopts,
               residual="4-bit symmetric per output channel, MSE clip search, transposed [K, N]",
               selector_calibration="wikitext2 valid, 8 x 256 tokens", rows=[], fp_ppl=None, gap_recovered=[],
               command="python " + " ".join(sys.argv), date=datetime.date.today().isoformat(), machine=machine)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        summ = []
        for r in res["rows"]:
            if r["k_fraction"] > 0:
                b0 = next(x["ppl"] for x in res["rows"] if x["bits"] == r["bits"] and x["method"] == r["method"]
                          and x["k_fraction"] == 0)
                gap = b0 - res["fp_ppl"]
                summ.append(dict(bits=r["bits"], method=r["method"], k_fraction=r["k_fraction"], selector=r["selector"],
                                 gap_recovered=round((b0 - r["ppl"]) / gap, 4) if gap > 0 else None))
        res["gap_recovered"] = summ
        res["elapsed_s"] = round(time.time() - t_start)
        out.write_text(json.dumps(res, indent=1) + "\n")

    def ppl(m, label):
        if a.time_limit and time.time() - t_start > a.time_limit:
            raise OutOfTime(label)
        t0 = time.time()
        p, n = perplexity(m, ids, ctx=a.ctx, progress=False)
        res["tokens"] = n
        print(f"{label:34s} ppl {p:9.3f}  ({n} tokens, {time.time() - t0:.0f}s)", flush=True)
        return p

    def quant(bits, method):
        m = copy.deepcopy(fp_model)
        t0 = time.time()
        kw = gopts if method == "gptq" else {}
        with keep_fp_weights() as fpw:
            quantize_model(m, f"w{bits}a16", method, group_size=a.group_size,
                           calib=None if method == "rtn" else qcal, progress=False, **kw)
        tq = time.time() - t0
        p = ppl(m, f"w{bits} {method} (quant {tq:.0f}s)")
        res["rows"].append(dict(bits=bits, method=method, k_fraction=0.0, selector=None, ppl=p, quant_s=round(tq, 1)))
        save()
        return p, m, fpw

    def sweep(bits, method, m, fpw, kl):
        compensate_model(m, fpw, k_fraction=kl[0], selector=a.selector, calib=scal)
        for _, cl in compensated_modules(m):
            cl.use_kernel = False                      # reference math (long windows)
        runs = [(k, a.selector) for k in kl]
        if a.exact_at and a.selector != "exact":
            runs.append((a.exact_at, "exact"))
        for k, sel in runs:
            for _, cl in compensated_modules(m):
                cl.selector = sel
            set_k_fraction(m, k)
            kf = [cl.k_fraction for _, cl in compensated_modules(m)]
            p = ppl(m, f"w{bits} {method} k={k} {sel} ({sum(kf) / len(kf):.4f})")
            res["rows"].append(dict(bits=bits, method=method, k_fraction=k,
                                    k_fraction_realised=round(sum(kf) / len(kf), 5), selector=sel, ppl=p))
            save()

    ks = [float(k) for k in a.k.split(",") if k]
    try:
        res["fp_ppl"] = ppl(fp_model, "fp")
        save()
        for bits in [int(b) for b in a.bits.split(",")]:
            _, m, fpw = quant(bits, "rtn")
            sweep(bits, "rtn", m, fpw, ks)
            del m, fpw
            best = None
            for method in [x for x in a.methods.split(",") if x]:
                p, m, fpw = quant(bits, method)
                if best is None or p < best[0]:
                    best = (p, method, m, fpw)
                del m, fpw
            if best:
                sweep(bits, best[1], best[2], best[3], ks)
                best = None
    except OutOfTime as e:
        print(f"time limit reached before {e}; stopping", flush=True)
        res["stopped_by_time_limit"] = True
    save()
    print(json.dumps(res["gap_recovered"], indent=1))


if __name__ == "__main__":
    main()
