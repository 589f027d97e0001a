"""WikiText-2 test perplexity of SmolLM2-135M-Instruct (dequantized Q4_1 GGUF = "fp") per quantization
format and method, on CPU. Writes bench/results/cpu/ppl_smollm2.json (after every row) and prints a table.

    python bench/ppl_smollm2.py [--max-tokens N] [--ctx 2048] [--calib-samples 16] [--calib-seqlen 512]

Group size 128 does not divide SmolLM2's hidden size 576, so "g128" rows use g128 where it divides
(down_proj, K=1536) and g64 for qkv/gate_up/o (K=576); the JSON records the sizes per Linear.
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
from specq.quant import quantize_model, weight_bytes  # noqa: E402
from specq.quant.calib import calib_tokens  # noqa: E402
from specq.quant.ppl import eval_text, perplexity  # noqa: E402

ROWS = ["fp", "w4a16:rtn:128", "w4a16:gptq:128", "w3a16:rtn:128", "w3a16:gptq:128", "w3a16:awq:128",
        "w4a16:awq:128", "w8a8:smoothquant:-1", "w4a8:gptq:128"]
BITS = {"fp": 16, "w4a16": 4, "w3a16": 3, "w2a16": 2, "w8a8": 8, "w4a8": 4}


def parse_row(r):
    """'fmt:method:group[:asym][:actorder]' -> (fmt, method, bits, group, sym, act_order)."""
    f = r.split(":")
    if f[0] == "fp":
        return "fp", None, 16, None, None, False
    return f[0], f[1], BITS[f[0]], int(f[2]), "asym" not in f[3:], "actorder" in f[3:]


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
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu" / "ppl_smollm2.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    base, tok = load_model(a.model, dtype=torch.float32, device=a.device)
    ids = torch.tensor(tok.encode(eval_text("wikitext2")), dtype=torch.long)
    calib = calib_tokens(tok, "wikitext2", a.calib_samples, a.calib_seqlen, seed=0)
    res = {"command": "python " + " ".join(sys.argv), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)",
           "data": "wikitext2_test.txt", "test_set_tokens": ids.numel(), "ctx": a.ctx,
           "calibration": f"WikiText-2 valid, {a.calib_samples} x {a.calib_seqlen} tokens",
           "date": datetime.date.today().isoformat(),
           "machine": (f"{torch.cuda.get_device_name()} (float32), torch {torch.__version__}" if a.device.startswith("cuda") else
                       f"{platform.machine()} {platform.processor() or ''} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}".strip()),
           "rows": []}
    if a.append and Path(a.out).is_file():
        old = json.loads(Path(a.out).read_text())
        res["rows"] = old["rows"]
        res["command"] = old["command"] + " ; " + res["command"]
    for fmt, method, bits, gs, sym, act in map(parse_row, a.rows.split(",")):
        t0 = time.time()
        m = base if fmt == "fp" else copy.deepcopy(base)
        try:
            if fmt != "fp":
                quantize_model(m, fmt, method, group_size=gs, sym=sym, calib=calib, progress=False, fit_group=True,
                               act_order=act)
            tq = time.time() - t0
            ppl, n = perplexity(m, ids, a.ctx, a.max_tokens, progress=False)
        except Exception as e:  # record the failure, go on with the other rows
            print(f"{fmt} {method}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        wb = weight_bytes(m)
        row = {"format": fmt, "method": method, "bits": bits, "group_size": gs, "ppl": round(ppl, 4),
               "sym": sym, "act_order": act, "tokens": n,
               "calibration": None if method in (None, "rtn") else f"{a.calib_samples}x{a.calib_seqlen}",
               "group_sizes": getattr(m, "quant_info", {}).get("group_sizes"),
               "linear_bytes_bf16_scales": wb["linear_bytes"], "quant_s": round(tq, 1),
               "eval_s": round(time.time() - t0 - tq, 1)}
        res["rows"].append(row)
        res["tokens"] = n
        print(f"{fmt:6s} {str(method):12s} g{gs} {'' if sym is None else 'sym' if sym else 'asym'}  ppl {ppl:8.3f}  tokens {n}  ({tq:.0f}s quant, {row['eval_s']:.0f}s eval)", flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        del m


if __name__ == "__main__":
    main()
