"""Calibration data and the layer-by-layer runner used by GPTQ, AWQ and SmoothQuant.

Calibration text: "wikitext2" (WikiText-2 valid), "gsm8k" (GSM8K train parquet, question + answer),
or a path to a UTF-8 text file; tokenised with the model's tokenizer and cut into `n` random
windows of `seqlen` tokens (seeded).
The runner feeds the windows through the decoder one layer at a time (no per-layer KV cache beyond
one window: setup_cache(seqlen) + causal_mask), capturing Linear inputs with forward hooks.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecqError
from ..models.llama import causal_mask
from .. import paths

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def read_gsm8k() -> str:
    from ..data import gsm8k_records
    return "\n\n".join(f"{r['question']}\n{r['answer']}" for r in gsm8k_records())


def calib_text(source: str = "wikitext2") -> str:
    if source == "wikitext2":
        return paths.data_file("wikitext2_valid.txt").read_text(encoding="utf-8")
    if source == "gsm8k":
        return read_gsm8k()
    p = Path(source)
    if not p.is_file():
        raise SpecqError(f"calibration source {source!r} is not 'wikitext2', 'gsm8k' or an existing text file")
    return p.read_text(encoding="utf-8", errors="replace")


def calib_tokens(tokenizer, source="wikitext2", n=32, seqlen=512, seed=0):
    """-> LongTensor [n, seqlen] of random windows of the tokenised calibration text."""
    ids = torch.tensor(tokenizer.encode(calib_text(source)[:4_000_000]), dtype=torch.long)
    if ids.numel() <= seqlen:
        raise SpecqError(f"calibration text too short: {ids.numel()} tokens, need more than {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def get(mod, name):
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


def set_(mod, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(get(mod, parent) if parent else mod, leaf, new)


class LayerRunner:
    """Holds the current hidden states of the calibration windows and steps them layer by layer.

    fp_stream: also step the windows through the unquantized layers (xs_fp), so a Linear's inputs
    from the quantized model can be paired with those of the full-precision model."""

    def __init__(self, model, tokens, fp_stream=False):  # tokens [n, L]
        self.model = model
        n, L = tokens.shape
        model.setup_cache(L)
        dev = model.device
        self.pos = torch.arange(L, device=dev)
        self.mask = causal_mask(0, L, L, device=dev)
        self.cos, self.sin = model.rope(self.pos)
        with torch.inference_mode():
            self.xs = [model.embed_tokens(t.to(dev)) for t in tokens]   # n x [L, D]
        self.xs_fp = list(self.xs) if fp_stream else None

    def _run(self, layer, x):
        return layer(x, self.cos, self.sin, self.pos, self.mask)

    @torch.inference_mode()
    def capture(self, layer, names, fn, fp_layer=None):
        """Run layer on every window, calling fn(name, x [L, K]) with each named Linear's input;
        with fp_layer (needs fp_stream), fn(name, x, x_fp) with the fp layer's input on the fp stream."""
        got = {}
        hooks = [get(layer, nm).register_forward_hook(
            (lambda m, a, o, nm=nm: fn(nm, a[0])) if fp_layer is None else
            (lambda m, a, o, nm=nm: fn(nm, a[0], got[nm]))) for nm in names]
        if fp_layer is not None:
            hooks += [get(fp_layer, nm).register_forward_hook(lambda m, a, o, nm=nm: got.__setitem__(nm, a[0]))
                      for nm in names]
        try:
            for i, x in enumerate(self.xs):
                if fp_layer is not None:
                    self._run(fp_layer, self.xs_fp[i])
                self._run(layer, x)
        finally:
            for h in hooks:
                h.remove()

    @torch.inference_mode()
    def advance(self, layer, fp_layer=None):
        self.xs = [self._run(layer, x) for x in self.xs]
        if fp_layer is not None:
            self.xs_fp = [self._run(fp_layer, x) for x in self.xs_fp]


def fold(layer, cfg, name, s):
    """Divide the input of Linear `name` by s [K] inside the previous op, multiply its columns by s."""
    s = s.to(layer.input_layernorm.weight.dtype)
    at, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        if name == "self_attn.qkv_proj":
            layer.input_layernorm.weight.div_(s)
        elif name == "mlp.gate_up_proj":
            layer.post_attention_layernorm.weight.div_(s)
        elif name == "mlp.down_proj":
            up = mlp.gate_up_proj.weight[mlp.inter:]
            up.div_(s[:, None])
        elif name == "self_attn.o_proj":
            if at.nh != at.nkv:
                raise ValueError("o_proj scale cannot be folded into v with grouped-query attention")
            v0 = (at.nh + at.nkv) * at.hd
            at.qkv_proj.weight[v0:].div_(s[:, None])
            if at.qkv_proj.bias is not None:
                at.qkv_proj.bias[v0:].div_(s)
        get(layer, name).weight.mul_(s[None, :])


def foldable(layer, name):
    return name != "self_attn.o_proj" or layer.self_attn.nh == layer.self_attn.nkv
