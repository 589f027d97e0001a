"""Compensated greedy decoding on the GPU through the real decode loop (specq.generate.Decoder): a 2-layer random model
of Llama-3.2-1B shape (vocab 4096), RTN W4A16 or W3A16, compensated at k = 0.5% (approx selector, calibrated on
random tokens). Greedy tokens of eager decoding, of the CUDA-graph Decoder, and of the compiled Decoder (the
CompensatedLinear as one opaque op); how often the one-token paths of specq.compensate.mma ran (in-grid on w4mma,
qdec1 apart, W3A16).   PYTHONPATH=$PWD python bench/dev/qdec_e2e_check.py   (FMTS=w3a16 K=0: one format, another k;
BUDGET=5%: k tuned by --compensate budget=5%, scope as BUDGET says, e.g. 5%,scope=linear; CKPT=1: also saved with
its residuals as `specq quantize --compensate` does, loaded back and decoded: tokens equal to the model it came from)"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.bench.randmodel import build_random, config  # noqa: E402
from specq.compensate import mma  # noqa: E402
from specq.compensate.linear import compensate_model, compensated_modules, keep_fp_weights  # noqa: E402
from specq.generate import Decoder  # noqa: E402
from specq.quant import quantize_model  # noqa: E402

N_NEW = 24


def greedy(model, ids, **kw):
    dec = Decoder(model, 64, **kw)
    t = int(dec.prefill(ids).argmax())
    out = [t]
    for _ in range(N_NEW - 1):
        lg = dec.step(t)
        assert torch.isfinite(lg).all()
        t = int(lg.argmax())
        out.append(t)
    return out


def logits_along(model, ids, toks, **kw):
    """Logits [N_NEW, V] of a Decoder fed the same tokens (teacher forcing: both runs stay on one trajectory)."""
    dec = Decoder(model, 64, **kw)
    out = [dec.prefill(ids).float().clone()]      # clone: a graph step returns its static output buffer, and
    for t in toks[:-1]:                           # .float() of float32 logits is that same tensor
        out.append(dec.step(t).float().clone())
    return torch.stack(out)


@torch.inference_mode()
def main():
    counts = {"ingrid": 0, "apart": 0, "w3": 0}
    li, la, l3 = mma.linear_ingrid, mma.partials, mma.linear_w3

    def ingrid(*a):
        y = li(*a)
        counts["ingrid"] += y is not None
        return y

    def apart(cl, x2, fp16, beside_w4mma=True, after=False):
        counts["apart"] += beside_w4mma
        return la(cl, x2, fp16, beside_w4mma, after)

    def w3(*a):
        counts["w3"] += 1
        return l3(*a)
    mma.linear_ingrid, mma.partials, mma.linear_w3 = ingrid, apart, w3
    print(torch.cuda.get_device_name(), torch.__version__)
    for fmt in os.environ.get("FMTS", "w4a16,w3a16").split(","):
        model = build_random(config("llama3.2-1b", num_layers=2, vocab_size=4096), "bf16", "cuda", torch.bfloat16)
        g = torch.Generator().manual_seed(1)
        if fmt != "bf16":                 # bf16: the unquantized model, no compensation (a peer for LOGITS)
            with keep_fp_weights() as fp:
                quantize_model(model, fmt, "rtn", progress=False)
            calib = torch.randint(0, 4096, (4, 64), generator=g)
            if os.environ.get("BUDGET"):  # --compensate budget=...: the tuner on this GPU (specq.compensate.tune)
                from specq.compensate import apply_compensation
                apply_compensation(model, f"budget={os.environ['BUDGET']}", fp=fp, calib=calib,
                                   log=lambda m: print(f"{fmt} {m}"))
            else:
                compensate_model(model, fp, k_fraction=float(os.environ.get("K", "0.005")), selector="approx",
                                 calib=calib)
        else:
            torch.randint(0, 4096, (4, 64), generator=g)
        ids = torch.randint(0, 4096, (12,), generator=g).cuda()
        res = {}
        for name, kw in (("eager", dict(cuda_graph=False)), ("graph", dict(cuda_graph=True)),
                         ("compiled", dict(cuda_graph=True, compile=True))):
            for k in counts:
                counts[k] = 0
            torch._dynamo.reset()
            res[name] = greedy(model, ids, **kw)
            print(f"{fmt} {name:8s} tokens {res[name][:12]}... one-token mma paths {dict(counts)}", flush=True)
        if os.environ.get("LOGITS"):      # compiled against eager on the eager tokens: where the numbers part
            torch._dynamo.reset()
            le = logits_along(model, ids, res["eager"], cuda_graph=False)
            torch._dynamo.reset()
            lc = logits_along(model, ids, res["eager"], cuda_graph=True, compile=True)
            torch._dynamo.reset()
            lg = logits_along(model, ids, res["eager"], cuda_graph=True)
            d, dg = (lc - le).abs().amax(1), (lg - le).abs().amax(1)
            print(f"{fmt} max |logit diff| compiled vs eager per step: {[round(float(v), 4) for v in d[:10]]}; "
                  f"graph vs eager: {[round(float(v), 4) for v in dg[:10]]}; max |logit| {le.abs().max().item():.2f}")
        if os.environ.get("CKPT") and fmt != "bf16":   # save_quantized + load_quantized (specq.compensate.store)
            import tempfile
            from specq.compensate import apply_compensation
            from specq.quant.checkpoint import load_quantized, save_quantized
            with tempfile.TemporaryDirectory() as tmp:
                model.quant_info["compensate"] = {"spec": f"k={os.environ.get('K', '0.005')}", "selector": "approx"}
                save_quantized(model, tmp)
                m2, _ = load_quantized(tmp, dtype=torch.bfloat16, device="cuda")
                pinned = all(cl.residual.codes.is_pinned() for _, cl in compensated_modules(m2))
                apply_compensation(m2, None, log=lambda m: print(f"{fmt} reloaded {m}"))
                for name, kw in (("eager", dict(cuda_graph=False)), ("graph", dict(cuda_graph=True))):
                    for k in counts:
                        counts[k] = 0
                    t2 = greedy(m2, ids, **kw)
                    print(f"{fmt} reloaded {name}: == in-memory eager {sum(a == b for a, b in zip(res['eager'], t2))}"
                          f"/{N_NEW}, codes pinned {pinned}, one-token mma paths {dict(counts)}", flush=True)
        same_g = sum(a == b for a, b in zip(res["eager"], res["graph"]))
        same_c = sum(a == b for a, b in zip(res["eager"], res["compiled"]))
        print(f"{fmt} k={os.environ.get('K', '0.005')} PDL={os.environ.get('SPECQ_PDL', '1')}: graph == eager "
              f"{same_g}/{N_NEW}, compiled == eager {same_c}/{N_NEW}")


if __name__ == "__main__":
    main()
