"""`specq quantize` and `specq ppl` subcommands (wired into specq/cli.py)."""
from __future__ import annotations

import json
import sys

from ..errors import SpecqError

FORMATS = ["w4a16", "w3a16", "w2a16", "w8a8", "w4a8"]
METHODS = ["rtn", "gptq", "awq", "awq_gptq", "smoothquant"]
DT = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _quant_args(p, required: bool):
    g = p.add_argument_group("quantization")
    g.add_argument("--format", default=None if not required else "w4a16", choices=FORMATS,
                   help="w4a16/w3a16/w2a16: weight-only 4/3/2-bit (packed, per group); w8a8: int8 weights per "
                        "channel + dynamic per-token int8 activations (SmoothQuant); w4a8: 4-bit weights + int8 "
                        "activations (per channel, or two-level with --group-size)" +
                        (" (default w4a16)" if required else " (default: none, evaluate the model as loaded)"))
    g.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn: round to nearest; gptq: Hessian-based error compensation; awq: activation-aware "
                        "scale + clip search, then RTN; awq_gptq: AWQ scales, then GPTQ; smoothquant: w8a8/w4a8 "
                        "smoothing then RTN (for w4a8, gptq also smooths first) (default rtn)")
    g.add_argument("--bits", type=int, default=None, help="weight bits; must agree with --format (optional check)")
    g.add_argument("--group-size", type=int, default=128,
                   help="input channels per scale: 32, 64, 128, or -1 = per output channel (default 128; w8a8 "
                        "is always per channel)")
    g.add_argument("--fit-group", action="store_true",
                   help="where --group-size does not divide a layer's input size (e.g. 128 vs 576), use the "
                        "largest smaller supported group that does instead of failing")
    g.add_argument("--quant-lm-head", action="store_true",
                   help="also quantize lm_head (RTN, weight-only formats; as gpt-fast int4 does); default: lm_head "
                        "stays in the compute dtype")
    g.add_argument("--asym", action="store_true", help="asymmetric (integer zero point) weight grid; default symmetric")
    g.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in decreasing Hessian diagonal "
                   "order (static groups, so the layout is unchanged)")
    g.add_argument("--clip", default=None, choices=["mse", "hessian"],
                   help="GPTQ group ranges: mse = shrink minimising the weight error when GPTQ reaches the group; "
                        "hessian = static groups whose range minimises the group's output error (default: min/max)")
    g.add_argument("--true-seq", action="store_true", help="GPTQ: calibrate each Linear of a layer on inputs from "
                   "the already quantized Linears before it")
    g.add_argument("--refit", action="store_true", help="GPTQ: refit the group scales (codes fixed) to the "
                   "least-squares optimum of each row's output error")
    g.add_argument("--fp-target", action="store_true", help="GPTQ: fit the full-precision model's outputs from "
                   "the quantized model's inputs (compensates the error accumulated upstream)")
    g.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    g.add_argument("--calib", default="wikitext2",
                   help="calibration text: wikitext2 (WikiText-2 valid), gsm8k (GSM8K train; needs pandas or "
                        "pyarrow), or a path to a text file (default wikitext2)")
    g.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for picking calibration windows (default 0)")
    from ..compensate.tune import add_compensate_arg
    add_compensate_arg(g, saved=required)


def _model_args(p):
    p.add_argument("--model", default="smollm2",
                   help="HF model directory, .gguf file, specq quantized directory, or 'smollm2' (default)")
    p.add_argument("--dtype", default="float32", choices=list(DT),
                   help="compute dtype (default float32; the CPU reference path)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _load(a):
    import torch
    from ..models import load_model
    return load_model(a.model, dtype=getattr(torch, a.dtype), device="cpu")


def _quantize(a, model, tok):
    from .quantize import quantize_model
    if a.calib_samples < 1 or a.calib_seqlen < 2:
        raise SpecqError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    return quantize_model(model, a.format, a.method, a.bits, a.group_size, not a.asym, progress=a.progress,
                          act_order=a.act_order, alpha=a.alpha, tokenizer=tok, calib_source=a.calib,
                          calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, seed=a.seed,
                          fit_group=a.fit_group, clip=a.clip, true_seq=a.true_seq, refit=a.refit,
                          fp_target=a.fp_target, damp=a.damp, lm_head=a.quant_lm_head)


def _check_compensate(a):
    """A bad --compensate spec, or one on a format without weight-only Linears, fails before the model load."""
    if not a.compensate:
        return
    from ..compensate.tune import parse_spec
    parse_spec(a.compensate)
    if a.format and not a.format.endswith("a16"):
        raise SpecqError(f"--compensate needs a weight-only --format (w4a16, w3a16, w2a16), not {a.format}")


def cmd_quantize(a) -> int:
    from ..compensate.linear import keep_fp_weights
    from .checkpoint import save_quantized
    from .quantize import check_lm_head, weight_bytes
    if a.quant_lm_head:
        check_lm_head(a.format)                      # before the (slow) model load
    _check_compensate(a)
    model, tok = _load(a)
    if getattr(model, "quant_info", None):
        raise SpecqError(f"{a.model} is already quantized")
    with keep_fp_weights() as fp:                    # the exact weights each quantized Linear came from (QDEC)
        _quantize(a, model, tok)
    if a.compensate:
        from ..compensate.tune import attach
        attach(model, a.compensate, fp, tokenizer=tok)
    out = save_quantized(model, a.out, tok, extra={"source": a.model})
    wb = weight_bytes(model)
    print(f"wrote {out}  ({a.format} {a.method}, group {a.group_size}{', lm_head RTN' if a.quant_lm_head else ''})")
    if a.compensate:
        from ..compensate import store
        size = (out / store.FILE).stat().st_size
        print(f"compensation residuals ({a.compensate}): {store.FILE}, {size / 2**20:.2f} MiB, kept in host memory "
              "when loaded; k is set when the checkpoint is loaded (budget= is tuned on that device)")
    print(f"decoder linear weights: {wb['linear_bytes'] / 2**20:.2f} MiB with bf16 scales vs "
          f"{wb['bf16_linear_bytes'] / 2**20:.2f} MiB in bf16 ({wb['ratio_vs_bf16']:.2f}x smaller); "
          f"whole model {wb['total_bytes'] / 2**20:.2f} MiB")
    return 0


def cmd_ppl(a) -> int:
    import torch
    from .kv import Int8KVCache
    from .ppl import eval_text, perplexity
    if a.quant_lm_head:
        from .quantize import check_lm_head
        if not a.format:
            raise SpecqError("--quant-lm-head needs --format (w4a16, w3a16, w2a16)")
        check_lm_head(a.format)                      # before the (slow) model load
    _check_compensate(a)
    model, tok = _load(a)
    fp = None
    if a.format:
        from ..compensate.linear import keep_fp_weights
        with keep_fp_weights() as fp:
            _quantize(a, model, tok)
    from ..compensate.linear import compensated_modules
    comp = {}
    if a.compensate or compensated_modules(model):   # or the residuals of a checkpoint saved with them
        from ..compensate.tune import apply_compensation
        comp = apply_compensation(model, a.compensate, fp=fp, tokenizer=tok,
                                  log=None if a.json else (lambda s: print(s, file=sys.stderr)))
    if a.kv_int8:
        orig = model.setup_cache
        model.setup_cache = lambda size, **kw: orig(size, cache_cls=Int8KVCache, **kw)
    if a.ctx < 2 or (a.max_tokens is not None and a.max_tokens < 2):
        raise SpecqError("--ctx and --max-tokens must be at least 2")
    ids = torch.tensor(tok.encode(eval_text(a.data)), dtype=torch.long)
    ppl, n = perplexity(model, ids, a.ctx, a.max_tokens, progress=a.progress)
    q = getattr(model, "quant_info", None) or {"format": "fp"}
    res = {"model": a.model, "data": a.data, "ppl": round(ppl, 4), "tokens": n, "ctx": a.ctx,
           "format": q.get("format"), "method": q.get("method"), "group_size": q.get("group_size"),
           "kv_int8": a.kv_int8, **({"lm_head": "quantized"} if q.get("lm_head") else {}),
           **({"compensate": a.compensate or (q.get("compensate") or {}).get("spec"),
               "k_fraction": {p: round(f, 6) for p, f in comp.items()}} if comp else {})}
    what = f"{q.get('format')} {q.get('method') or ''}".rstrip() + (f", compensate {res['compensate']}" if comp else "")
    print(json.dumps(res) if a.json else f"perplexity {ppl:.4f} over {n} tokens ({a.data}, windows of {a.ctx}, {what})")
    return 0


def add_quantize_parser(sub):
    p = sub.add_parser("quantize", help="quantize a model and save a specq quantized checkpoint",
                       description="Quantize every decoder Linear (qkv, o, gate_up, down; not embeddings, nor lm_head "
                                   "unless --quant-lm-head) "
                                   "and write DIR/model.safetensors + DIR/config.json (with a 'quantization' section) "
                                   "+ the tokenizer. Prints the weight bytes.")
    _model_args(p)
    _quant_args(p, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_quantize)
    return p


def add_ppl_parser(sub):
    p = sub.add_parser("ppl", help="perplexity of a (optionally quantized) model on WikiText-2 or a text file",
                       description="Perplexity over non-overlapping windows of --ctx tokens: each window starts "
                                   "fresh, its first token is context only and every other token is scored; the "
                                   "number of scored tokens is printed. Optionally quantize first (--format).")
    _model_args(p)
    _quant_args(p, required=False)
    p.add_argument("--data", default="wikitext2",
                   help="wikitext2 (test split), wikitext2_valid, or a path to a text file (default wikitext2)")
    p.add_argument("--max-tokens", type=int, default=None, help="read at most this many tokens (default: all)")
    p.add_argument("--ctx", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--kv-int8", action="store_true", help="use the int8 KV cache")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_ppl)
    return p


def main(argv=None) -> int:  # standalone: python -m specq.quant.cli quantize|ppl ... (same as `specq ...`)
    from ..cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
