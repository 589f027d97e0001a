"""Compiled against eager decoding on the CPU (opaque quantized ops forced as on CUDA): max |logit difference| per step
of a tiny random model, bf16, fed the eager tokens.   python bench/dev/compile_logits_cpu.py {bf16,w4a16,w3a16} bf16"""
import torch, sys
from specq.bench.randmodel import build_random, config
from specq.generate import Decoder
from specq.quant import opaque, quantize_model
torch.manual_seed(0)
opaque.FORCE = True
fmt = sys.argv[1]
dt = torch.bfloat16 if sys.argv[2] == "bf16" else torch.float32
model = build_random(config("tiny", num_layers=2), "bf16", "cpu", dt)
if fmt != "bf16":
    quantize_model(model, fmt, "rtn", progress=False, group_size=32, fit_group=True)
ids = torch.randint(0, 300, (12,))
def run(comp):
    torch._dynamo.reset()
    dec = Decoder(model, 48, cuda_graph=False, compile=comp)
    out = [dec.prefill(ids).float()]
    toks = [int(out[0].argmax())]
    for i in range(8):
        out.append(dec.step(toks[-1] if not comp else ref_toks[i]).float()); toks.append(int(out[-1].argmax()))
    return torch.stack(out), toks
ref_toks = None
le, ref_toks = run(False)
lc, _ = run(True)
print(fmt, sys.argv[2], "max|logit| %.3f" % le.abs().max().item(), "diff per step", [round(v, 5) for v in (lc-le).abs().amax(1).tolist()])
