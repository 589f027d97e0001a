"""WikiText-2 test perplexity of SmolLM2-135M-Instruct (dequantized Q4_1 GGUF = "fp") per quantization
format and method. Writes --out (after every row) and prints a table.

    python bench/ppl_smollm2.py [--max-tokens N] [--ctx 2048] [--calib-samples 16] [--calib-seqlen 512]
    python3 bench/ppl_smollm2.py --model /root/models/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
        --calib-samples 128 --calib-seqlen 2048 --time-limit 480 --out $OUT/ppl_smollm2.json   # GPU, whole set

Rows: fmt:method:group[:opt...], opts asym | actorder | clip=mse|hessian | tseq (true-sequential) |
refit (scale refit) | fpt (fp-target calibration) | damp=F | calib=NxL (this row's calibration
windows instead of --calib-samples x --calib-seqlen); see specq.quant.quantize_model. Group size 128 does
not divide SmolLM2's hidden size 576, so "g128" rows use g128 where it divides (down_proj, K=1536) and
g64 for qkv/gate_up/o (K=576); the JSON records the sizes per Linear. --time-limit: no new row starts
after that many seconds (the rows done are in the JSON). Quantized Linears are evaluated with the
fp32 reference math (x @ dequantize()^T) unless --kernel (the GPU kernels may use TF32/bf16 dots).
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
from specq.models import load_model  # noqa: E402
from specq.quant import WQLinear, quantize_model, weight_bytes  # noqa: E402
from specq.quant.calib import calib_tokens  # noqa: E402
from specq.quant.ppl import eval_text, perplexity  # noqa: E402

GPTQ = "asym:actorder:clip=hessian:tseq:refit:fpt"          # the best GPTQ settings (docs/quantization.md)
ROWS = ["fp", "w8a8:smoothquant:-1", "w4a8:gptq:128", "w4a16:rtn:128", f"w4a16:gptq:128:{GPTQ}", "w4a16:awq:128",
        "w3a16:rtn:128", f"w3a16:gptq:128:{GPTQ}", "w3a16:awq:128"]
BITS = {"fp": 16, "w4a16": 4, "w3a16": 3, "w2a16": 2, "w8a8": 8, "w4a8": 4}


FLAGS = {"actorder": "act_order", "tseq": "true_seq", "refit": "refit", "fpt": "fp_target"}


def _ref_matmul(x2, mod):  # WQLinear kernel hook: the fp32 reference math on any device
    return x2 @ mod.dequantize().to(x2.dtype).t()


def parse_row(r):
    """'fmt:method:group[:opt...]' -> (fmt, method, bits, group, sym, quantize_model kwargs)."""
    f = r.split(":")
    if f[0] == "fp":
        return "fp", None, 16, None, None, {}
    kw = {}
    for o in f[3:]:
        if o.startswith("clip="):
            kw["clip"] = o[5:]
        elif o.startswith("calib="):
            kw["calib"] = tuple(int(v) for v in o[6:].split("x"))
        elif o.startswith("damp="):
            kw["damp"] = float(o[5:])
        elif o in FLAGS:
            kw[FLAGS[o]] = True
        elif o != "asym":
            raise SystemExit(f"unknown row option {o!r} in {r!r}")
    return f[0], f[1], BITS[f[0]], int(f[2]), "asym" not in f[3:], kw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens of the test set to read (default all)")
    ap.add_argument("--ctx", type=int, default=2048, help="window length (default 2048)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma list of fmt:method:group[:asym][:actorder] rows "
                    "(default: the standard table)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing results file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    ap.add_argument("--model", default="smollm2", help="model (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--kernel", action="store_true", help="evaluate W4A16 Linears with the registered GPU kernel "
                    "(default: the fp32 reference math)")
    ap.add_argument("--time-limit", type=float, default=0.0, help="seconds; no new row starts after it (0 = none)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu" / "ppl_smollm2.json"))
    a = ap.parse_args()
    t_start = time.time()
    torch.set_num_threads(2)
    base, tok = load_model(a.model, dtype=torch.float32, device=a.device)
    ids = torch.tensor(tok.encode(eval_text("wikitext2")), dtype=torch.long)
    calibs = {}

    def calib_for(n, L):
        if (n, L) not in calibs:
            calibs[(n, L)] = calib_tokens(tok, "wikitext2", n, L, seed=0)
        return calibs[(n, L)]
    res = {"command": "python " + " ".join(sys.argv), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)",
           "data": "wikitext2_test.txt", "test_set_tokens": ids.numel(), "ctx": a.ctx,
           "calibration": f"WikiText-2 valid, {a.calib_samples} x {a.calib_seqlen} tokens",
           "date": datetime.date.today().isoformat(),
           "quantized_matmul": "registered kernel" if a.kernel else "fp32 reference (x @ dequantize()^T)",
           "machine": (f"{torch.cuda.get_device_name()} (float32), torch {torch.__version__}" if a.device.startswith("cuda") else
                       f"{platform.machine()} {platform.processor() or ''} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}".strip()),
           "rows": []}
    if a.append and Path(a.out).is_file():
        old = json.loads(Path(a.out).read_text())
        res["rows"] = old["rows"]
        res["command"] = old["command"] + " ; " + res["command"]
    rows = [parse_row(r) for r in a.rows.split(",")]
    for fmt, method, bits, gs, sym, kw in rows:
        if a.time_limit and time.time() - t_start > a.time_limit:
            print(f"time limit: {fmt} {method} and later rows not run", flush=True)
            res["stopped_by_time_limit"] = True
            break
        t0 = time.time()
        m = base if fmt == "fp" else copy.deepcopy(base)
        try:
            ncal = kw.pop("calib", (a.calib_samples, a.calib_seqlen))
            if fmt != "fp":
                quantize_model(m, fmt, method, group_size=gs, sym=sym, calib=calib_for(*ncal), progress=False,
                               fit_group=True, **kw)
                if not a.kernel:
                    for mod in m.modules():
                        if isinstance(mod, WQLinear):
                            mod.kernel = _ref_matmul
            tq = time.time() - t0
            ppl, n = perplexity(m, ids, a.ctx, a.max_tokens, progress=False)
        except Exception as e:  # record the failure, go on with the other rows
            print(f"{fmt} {method}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        wb = weight_bytes(m)
        row = {"format": fmt, "method": method, "bits": bits, "group_size": gs, "ppl": round(ppl, 4),
               "sym": sym, "act_order": kw.get("act_order", False),
               "options": {k: v for k, v in getattr(m, "quant_info", {}).items()
                           if k in ("clip", "true_seq", "refit", "fp_target") and v} or None,
               "damp": kw.get("damp"),
               "tokens": n,
               "calibration": None if method in (None, "rtn") else f"{ncal[0]}x{ncal[1]}",
               "group_sizes": getattr(m, "quant_info", {}).get("group_sizes"),
               "linear_bytes_bf16_scales": wb["linear_bytes"], "quant_s": round(tq, 1),
               "eval_s": round(time.time() - t0 - tq, 1)}
        res["rows"].append(row)
        res["tokens"] = n
        print(f"{fmt:6s} {str(method):12s} g{gs} {'' if sym is None else 'sym' if sym else 'asym'} {','.join(kw)}  ppl {ppl:8.3f}  tokens {n}  ({tq:.0f}s quant, {row['eval_s']:.0f}s eval)", flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        res["elapsed_s"] = round(time.time() - t_start)
        Path(a.out).write_text(json.dumps(res, indent=2))
        del m
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    res["elapsed_s"] = round(time.time() - t_start)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
