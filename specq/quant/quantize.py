"""quantize_model: swap every decoder Linear (qkv_proj, o_proj, gate_up_proj, down_proj) for a
quantized module; lm_head and embeddings stay in the compute dtype, unless lm_head=True (weight-only
formats, as gpt-fast's int4 mode does): then lm_head becomes a WQLinear [K=hidden, N=vocab] quantized by
RTN with the same bits / group size / grid, whatever the method of the decoder Linears. A tied lm_head is
untied: embed_tokens keeps its full-precision weight, the head is a separate quantized module.

Formats and methods:
  w4a16 / w3a16 / w2a16 (WQLinear): rtn | gptq | awq (scale search + clip search + RTN) | awq_gptq
  w8a8 (W8A8Linear): rtn (no smoothing) | smoothquant (alpha-smoothing, then RTN)
  w4a8 (W4A8Linear, group -1 or 128): rtn | smoothquant | gptq (smoothing, then GPTQ on the
        two-level grid)
Scales (AWQ, SmoothQuant) are folded into the previous op: input_layernorm for qkv_proj,
post_attention_layernorm for gate_up_proj, the up rows of gate_up_proj for down_proj, and the v rows
of qkv_proj for o_proj when num_heads == num_kv_heads (with GQA o_proj is left unscaled).
Calibration runs layer by layer; each layer sees the outputs of the already quantized layers.
"""
from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from ..errors import SpecqError
from . import pack as P
from .awq import search_clip, search_scale
from .calib import LINEARS, LayerRunner, calib_tokens, fold, foldable, get, set_
from .gptq import gptq, hessian_add
from .search import refit_scales, search_params
from .w8a8 import W4A8Linear, W8A8Linear
from .wq import WQLinear

FORMATS = {"w4a16": 4, "w3a16": 3, "w2a16": 2, "w8a8": 8, "w4a8": 4}
METHODS = {"a16": ("rtn", "gptq", "awq", "awq_gptq"), "w8a8": ("rtn", "smoothquant"),
           "w4a8": ("rtn", "smoothquant", "gptq")}
QUANT_TYPES = (WQLinear, W8A8Linear, W4A8Linear)


def check_args(fmt, method, bits, group_size):
    fmt = (fmt or "").lower()
    if fmt not in FORMATS:
        raise SpecqError(f"unknown format {fmt!r} (supported: {', '.join(FORMATS)})")
    if bits is not None and bits != FORMATS[fmt]:
        raise SpecqError(f"--bits {bits} contradicts format {fmt} ({FORMATS[fmt]} bits); "
                         f"use w{bits}a16 for {bits}-bit weight-only" if bits in (2, 3, 4) else
                         f"unsupported bits {bits} for format {fmt}")
    kind = fmt if fmt in METHODS else "a16"
    if method not in METHODS[kind]:
        raise SpecqError(f"method {method!r} not available for {fmt} (choose from {', '.join(METHODS[kind])})")
    if fmt != "w8a8":
        P.check_shape(128 * 32, FORMATS[fmt], group_size)   # bits / group size values
    return fmt, FORMATS[fmt]


def check_lm_head(fmt):
    """lm_head quantization is weight-only: raise for w8a8 / w4a8."""
    if not str(fmt).lower().endswith("a16"):
        raise SpecqError(f"lm_head quantization needs a weight-only format (w4a16, w3a16, w2a16), not {fmt}")


def _group_for(K, bits, gs, fit):
    if not fit or gs == -1 or K % gs == 0:
        P.check_shape(K, bits, gs)
        return gs
    for g in (64, 32):
        if g < gs and K % g == 0:
            P.check_shape(K, bits, g)
            return g
    P.check_shape(K, bits, gs)


def _smooth_scale(amax_x, W, alpha):
    amax_w = W.float().abs().amax(0).clamp(min=1e-5)
    s = amax_x.clamp(min=1e-5).pow(alpha) / amax_w.pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def quantize_model(model, fmt="w4a16", method="rtn", bits=None, group_size=128, sym=True, calib=None,
                   progress=True, act_order=False, alpha=0.5, awq_tokens=2048, damp=0.01, tokenizer=None,
                   calib_source="wikitext2", calib_samples=32, calib_seqlen=512, seed=0, fit_group=False,
                   clip=None, true_seq=False, refit=False, fp_target=False, lm_head=False):
    """Quantize model in place and return it. calib: LongTensor [n, L] of calibration tokens
    (specq.quant.calib.calib_tokens), needed by every method except rtn; when None and a tokenizer is
    given, calib_samples windows of calib_seqlen tokens are drawn from calib_source.
    fit_group: where group_size does not divide a Linear's input dimension, use the largest supported
    smaller group that does (e.g. 64 for K=576) instead of raising.
    Weight-only GPTQ options (same format, better numbers; see specq.quant.search):
      clip: None (min/max or absmax groups) | "mse" (per group, the range shrink minimising the weight
        error, chosen when GPTQ reaches the group) | "hessian" (static groups whose range minimises the
        group's output error under the input Hessian, chosen up front from the unquantized weight).
      true_seq: each Linear of a layer is calibrated on inputs from the already quantized Linears
        before it (qkv -> o -> gate_up -> down), not only from the quantized previous layers.
      refit: after GPTQ, refit each row's group scales (codes and zeros fixed) to the least-squares
        optimum of the row's output error under H.
      fp_target: calibrate against the full-precision model's outputs: with X the Linear's inputs in the
        quantized model and X_fp those in the full-precision model, GPTQ quantizes the least-squares
        target W* = W C H^-1 (C = X_fp^T X, H = X^T X), which minimises ||X_fp W^T - X W*^T||: the error
        already accumulated upstream is compensated where possible (GPTAQ's objective). Computed as
        W + W (C - H) (H + damping)^-1, so W* = W exactly when the two models' inputs agree.
    lm_head: also quantize lm_head (weight-only formats only; always RTN; untied from embed_tokens)."""
    fmt, bits = check_args(fmt, method, bits, group_size)
    gs0 = -1 if fmt == "w8a8" else group_size
    weight_only = fmt.endswith("a16")
    if lm_head:
        check_lm_head(fmt)
    if lm_head and not isinstance(model.lm_head, torch.nn.Linear):
        raise SpecqError(f"lm_head is already quantized ({type(model.lm_head).__name__})")
    gsz = {}                                             # Linear name -> group size used
    for i, layer in enumerate(model.layers):
        for nm in LINEARS:
            lin = get(layer, nm)
            if not isinstance(lin, torch.nn.Linear):
                raise SpecqError(f"layer {i} {nm} is already quantized ({type(lin).__name__})")
            gsz[nm] = gs0 if fmt == "w8a8" else _group_for(lin.in_features, bits if weight_only else 4, gs0, fit_group)
    if lm_head:
        gsz["lm_head"] = _group_for(model.lm_head.in_features, bits, gs0, fit_group)
    if method != "rtn" and calib is None and tokenizer is not None:
        calib = calib_tokens(tokenizer, calib_source, calib_samples, calib_seqlen, seed)
    if method != "rtn" and calib is None:
        raise SpecqError(f"method {method} needs calibration tokens (calib=...)")
    cfg = model.cfg
    if clip not in (None, "mse", "hessian"):
        raise SpecqError(f"unknown clip search {clip!r} (None, 'mse' or 'hessian')")
    fp_target = bool(fp_target) and weight_only and method in ("gptq", "awq_gptq")
    runner = LayerRunner(model, calib, fp_stream=fp_target) if method != "rtn" else None
    want_h = method in ("gptq", "awq_gptq")
    want_x = method in ("awq", "awq_gptq")
    want_amax = not weight_only and method != "rtn"
    n = calib.shape[0] if calib is not None else 1
    rows = max(1, awq_tokens // n)
    it = tqdm(model.layers, desc=f"{fmt} {method}", disable=not progress, unit="layer")
    for layer in it:
        H, X, amax, C = {}, {}, {}, {}
        fp_layer = None

        def stat(nm, x, x_fp=None):
            x = x.reshape(-1, x.shape[-1]).float()
            if x_fp is not None:                 # C = X_fp^T X
                C[nm] = hessian_add(C.get(nm, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)), x_fp, x)
            if want_h:
                H[nm] = hessian_add(H.get(nm, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)), x)
            if want_x:
                X.setdefault(nm, []).append(x[torch.linspace(0, x.shape[0] - 1, rows).long()])
            if want_amax:
                a = x.abs().amax(0)
                amax[nm] = torch.maximum(amax[nm], a) if nm in amax else a

        def capture(names):
            for nm in names:
                H.pop(nm, None), X.pop(nm, None), amax.pop(nm, None), C.pop(nm, None)
            runner.capture(layer, names, stat, fp_layer)
            for nm in names:
                if nm in X:
                    X[nm] = torch.cat(X[nm])

        if runner is not None and not (fp_target and not want_x):
            capture(LINEARS)
        # 1. equivalent rescaling (AWQ search or SmoothQuant), folded into the previous op
        for nm in ("self_attn.o_proj", "mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj"):
            if not foldable(layer, nm) or not (want_x or want_amax):
                continue
            W = get(layer, nm).weight
            gs = gsz[nm]
            if want_x:
                s = search_scale(W, X[nm], bits, gs, sym)
            else:
                s = _smooth_scale(amax[nm], W, alpha)
            fold(layer, cfg, nm, s)
            s = s.float()
            if nm in X:
                X[nm] = X[nm] / s
            if nm in H:
                H[nm] = H[nm] / s.double()[:, None] / s.double()[None, :]
        if fp_target:                            # pair the inputs with the fp model's (after any folding)
            fp_layer = copy.deepcopy(layer)
            capture(LINEARS)
        # 2. quantize
        for j, nm in enumerate(LINEARS):
            if true_seq and j > 0 and runner is not None:
                capture((nm,))                   # inputs from this layer's already quantized Linears
            lin = get(layer, nm)
            W = lin.weight.data
            gs = gsz[nm]
            if weight_only:
                if want_h:
                    new = _wq_gptq(lin, H[nm], bits, gs, sym, act_order, damp, clip, refit, C.get(nm))
                else:
                    cl = search_clip(W, X[nm], bits, gs, sym) if want_x else None
                    new = WQLinear.from_linear(lin, bits, gs, sym, cl)
            elif fmt == "w8a8":
                new = W8A8Linear.from_linear(lin)
            elif method == "gptq":
                new = _w4a8_gptq(lin, H[nm], gs, act_order, damp)
            else:
                new = W4A8Linear.from_linear(lin, gs)
            set_(layer, nm, new)
        if runner is not None:
            runner.advance(layer, fp_layer)
    if lm_head:                                          # RTN codes [V, D]; a tied embed_tokens keeps its weight
        set_(model, "lm_head", WQLinear.from_linear(model.lm_head, bits, gsz["lm_head"], sym))
    model.quant_info = dict(format=fmt, method=method, bits=bits, group_size=gs0, sym=bool(sym) if weight_only else True,
                            act_order=bool(act_order), alpha=alpha if want_amax else None,
                            clip=clip if want_h else None, true_seq=bool(true_seq), refit=bool(refit and want_h),
                            fp_target=fp_target, lm_head=bool(lm_head),
                            group_sizes=dict(gsz))
    return model


def _wq_gptq(lin, H, bits, gs, sym, act_order, damp, clip, refit, C=None):
    W = lin.weight.data
    if C is not None:                            # W* = W + W (C - H) Hd^-1 = W C H^-1 up to the damping
        Hd = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        Hd[torch.diag(H) == 0, torch.diag(H) == 0] = 1
        W = W + torch.linalg.solve(Hd, (C - H).t() @ W.double().t()).t().to(W.dtype)
    init, params = None, None
    if clip == "hessian":
        init = search_params(W, bits, gs, sym, H)
    elif clip == "mse":
        params = lambda wg: search_params(wg, bits, -1, sym)
        params = lambda wg, f=params: tuple(t[:, 0] for t in f(wg))
    q, s, z = gptq(W, H, bits, gs, sym, act_order, damp=damp, params=params, init=init)
    if refit:
        s = refit_scales(W, H, q, z, s)
    return WQLinear.from_codes(q, s, z, bits, gs, sym, lin.bias, W.dtype)


def _w4a8_gptq(lin, H, gs, act_order, damp):
    W = lin.weight.data.float()
    sw = W4A8Linear.channel_scale(W, gs)
    if gs == -1:
        params = lambda wg: (sw.clone(), torch.full_like(sw, 8.0))
    else:
        params = lambda wg: (sw * W4A8Linear.group_scale(wg / sw[:, None]), torch.full_like(sw, 8.0))
    q, s, _ = gptq(W, H, 4, gs, True, act_order, damp=damp, params=params)
    w4 = q.float() - 8
    gscale = None if gs == -1 else torch.round(s / sw[:, None])
    return W4A8Linear.from_codes(w4, sw, gscale, lin.bias, lin.weight.dtype)


def weight_bytes(model, float_bytes: int | None = 2) -> dict:
    """Bytes of the decoder Linears (quantized buffers included) and of the whole model.

    float_bytes: count every floating-point tensor at this many bytes (2 = as stored in bf16),
    None = at its actual dtype. bf16_linear_bytes is what the same Linears take unquantized in bf16."""
    def nbytes(t):
        return t.numel() * (float_bytes if (float_bytes and t.is_floating_point()) else t.element_size())
    lin, ref = 0, 0
    for layer in model.layers:
        for nm in LINEARS:
            m = get(layer, nm)
            lin += sum(nbytes(t) for t in m.state_dict().values())
            ref += 2 * (m.in_features * m.out_features + (m.out_features if getattr(m, "bias", None) is not None else 0))
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += nbytes(t)
    return {"linear_bytes": lin, "bf16_linear_bytes": ref, "ratio_vs_bf16": ref / max(lin, 1), "total_bytes": total}
