"""W4A16 calibration variant comparison on CPU (8 windows of 2048 WikiText-2 test tokens spread over the set = 16,376 scored tokens; calibration 32x512 from specq.quant.calib.calib_tokens("wikitext2") unless _calib). usage: PYTHONPATH=. python bench/dev/gptq_variants.py NAME 'kwargs-json'  (appends to results.jsonl in cwd)"""
import json, sys, time, copy
import torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))
from specq.models import load_model
from specq.quant import quantize_model
from specq.quant.calib import calib_tokens
from specq.quant.ppl import eval_text, perplexity
torch.set_num_threads(int(__import__("os").environ.get("NT", "2")))
name, kw = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
m, tok = load_model("smollm2")
ids = torch.tensor(tok.encode(eval_text("wikitext2")), dtype=torch.long)
W, NW = 2048, int(kw.pop("_nwin", 8))
starts = torch.linspace(0, ids.numel() - W - 1, NW).long().tolist()
ev = torch.cat([ids[s:s + W] for s in starts])
cs, cl = kw.pop("_calib", [32, 512])
calib = calib_tokens(tok, "wikitext2", cs, cl, seed=kw.pop("_seed", 0))
t0 = time.time()
if name != "fp":
    fmt = kw.pop("fmt", "w4a16"); method = kw.pop("method", "gptq")
    quantize_model(m, fmt, method, group_size=128, calib=calib, progress=False, fit_group=True, **kw)
tq = time.time() - t0
p, n = perplexity(m, ev, 2048, progress=False)
r = dict(name=name, kw=sys.argv[2] if len(sys.argv) > 2 else "", ppl=round(p, 4), tokens=n, calib=f"{cs}x{cl}", quant_s=round(tq), eval_s=round(time.time() - t0 - tq))
print(json.dumps(r), flush=True)
open("results.jsonl", "a").write(json.dumps(r) + "\n")
