"""CompensatedLinear: a quantized Linear plus dynamic error compensation (a module swap).

    y = base(x) + x[S] @ R[S, :]      S = salient input channels of each token row, chosen from x

Every row of a multi-token input (prefill, speculative verification) gets its own salient set, so a
verification forward equals the same tokens decoded one at a time.
CPU / no kernel: reference math in torch (gather the selected rows; long inputs gather blocks of rows
from the cached dequantized residual in host memory; on a GPU only those rows are copied over). CUDA: specq.compensate.kernel (unless use_kernel is False); one token on specq's W4A16 weight with the
w4mma layout, or on the W3A16 kernel: specq.compensate.mma (the compensation kernel before the GEMV on the same
stream, no add kernel).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import SpecqError
from . import select as SEL
from .residual import Residual

GATHER_MAX = 1 << 22        # above M*k*N elements: blocks of rows gathered from the cached dequantized R


class CompensatedLinear(nn.Module):
    def __init__(self, base: nn.Module, residual: Residual, k_chunk: int | None = None, k: int | None = None,
                 selector: str = "exact", stats: torch.Tensor | None = None):
        super().__init__()
        if selector not in ("exact", "approx"):
            raise SpecqError(f"unknown selector {selector!r} (exact or approx)")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        if (residual.K, residual.N) != (self.in_features, self.out_features):
            raise SpecqError(f"residual shape {(residual.K, residual.N)} does not match the layer "
                             f"({self.in_features}, {self.out_features})")
        self.residual = residual                   # plain attribute: stays on the host
        self.n_chunks, self.chunk = SEL.chunking(self.in_features)
        self.selector = selector
        self.stats = stats                         # calibration order statistics [T, n, keep] or None
        self.register_buffer("thr", None, persistent=False)
        self.set_k(k_chunk if k is None else -(-k // self.n_chunks))
        self.use_kernel = True                     # CUDA: Triton kernel if available
        self.use_fused = True                      # ... and, on specq's W4A16 base, no separate add (kernel.fused)
        self.use_mma = True                        # ... one token on w4mma: specq.compensate.mma

    def set_k(self, k_chunk: int, selector: str | None = None):
        """Set channels per chunk (0 disables) and recompute the bucket thresholds."""
        if k_chunk is None or k_chunk < 0:
            raise SpecqError(f"invalid compensation k per chunk: {k_chunk!r}")
        self.k_chunk = min(int(k_chunk), self.chunk)
        self.selector = selector or self.selector
        if self.selector == "approx" and self.k_chunk:
            if self.stats is None:
                raise SpecqError("approx selector needs calibration activations (calib=...)")
            dev = self.base.scales.device if hasattr(self.base, "scales") else "cpu"
            self.thr = SEL.thresholds(self.stats, self.k_chunk).to(dev)
        return self

    @property
    def k(self) -> int:  # selected channels per token row
        return self.k_chunk * self.n_chunks

    @property
    def k_fraction(self) -> float:
        return self.k / self.in_features

    def select(self, x2: torch.Tensor) -> torch.Tensor:  # x2 [M, K] -> idx [M, k]
        if self.selector == "exact":
            return SEL.exact_topk(x2, self.k)
        return SEL.approx_topk(x2, self.thr, self.k_chunk)

    def correction(self, x2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reference math: x2 [M, K], idx [M, k] -> x2[S] @ R[S, :] float32 [M, N]."""
        M, k = idx.shape
        R = self.residual
        xs = torch.gather(x2, 1, idx).float()                                  # [M, k]
        if M * k * R.N <= GATHER_MAX:
            rows = R.rows(idx).to(x2.device)                                    # [M, k, N]
            return torch.einsum("mk,mkn->mn", xs, rows)
        full, idc = R.full(), idx.cpu()                                         # [K, N] host, cached
        b = max(1, GATHER_MAX // (k * R.N))                                     # token rows per block
        return torch.cat([torch.einsum("mk,mkn->mn", xs[i:i + b], full[idc[i:i + b]].to(x2.device))
                          for i in range(0, M, b)])

    def forward(self, x):  # x [..., K] -> [..., N]
        if self.k_chunk == 0:
            return self.base(x)
        shp = x.shape
        from ..quant import opaque       # under torch.compile (CUDA): one opaque op that runs matmul2d eagerly
        return opaque.matmul(self, x.reshape(-1, shp[-1])).reshape(*shp[:-1], self.out_features)

    def matmul2d(self, x2):  # x2 [M, K] -> [M, N], bias included: the compensated Linear, eagerly
        if x2.is_cuda and self.use_kernel:
            from . import kernel
            if kernel.available():
                y = self._fused(x2)
                if y is not None:
                    return y
                h = kernel.launch(self, x2)            # side stream, overlaps the quantized GEMV
                return kernel.join(h, self.base(x2))
        y = self.base(x2)
        r = self.correction(x2, self.select(x2))
        return (y.float() + r).to(y.dtype)

    def _fused(self, x2):
        """specq's W4A16 kernel as the base: GEMV and compensation as partials of one launch (kernel.fused),
        or on w4mma / the W3A16 kernel after qdec1 at one token (specq.compensate.mma); None (other bases, exact
        dense residuals, shapes the kernels do not take): the side-stream path."""
        if not self.use_fused or self.residual.dense is not None:
            return None
        from . import kernel, mma
        perm = getattr(self.base, "perm", None)
        bias = getattr(self.base, "bias", None)
        get3 = getattr(self.base, "w3a16_for", None)
        w3 = get3(x2.dtype) if (perm is None and get3 is not None and self.use_mma) else None   # None unless 3-bit
        if w3 is not None and mma.usable_qdec1(self, x2):
            y = mma.linear_w3(self, x2, w3)
            return y + bias.to(y.dtype) if bias is not None else y
        get = getattr(self.base, "w4a16_for", None)
        w = get(x2.dtype) if get is not None else None
        if w is None:
            return None
        if perm is None and self.use_mma and mma.usable(self, x2, getattr(w, "mma", None)):
            y = mma.linear(self, x2, w.mma)         # one token on w4mma, the decode kernel
        else:
            y = kernel.fused(self, x2, w, x2[:, perm] if perm is not None else x2)
        return y + bias.to(y.dtype) if (y is not None and bias is not None) else y

    def extra_repr(self):
        return f"k_chunk={self.k_chunk} x {self.n_chunks} chunks (k={self.k}/{self.in_features}), selector={self.selector}"


# ---------------------------------------------------------------------------------------------
# whole-model swap

def _quantized_types():
    from ..quant.wq import WQLinear
    return (WQLinear,)


@contextmanager
def keep_fp_weights():
    """Record, during specq.quant.quantize_model, the exact full-precision weight each WQLinear was
    made from (after AWQ scale folding): yields {WQLinear module: W [N, K] float32}.

        with keep_fp_weights() as fp:
            quantize_model(model, "w3a16", "gptq", calib=...)
        compensate_model(model, fp, k_fraction=0.01)
    """
    from ..quant import quantize as Q
    orig, store = Q.set_, {}

    def set_(layer, nm, new):
        old = Q.get(layer, nm)
        if isinstance(old, nn.Linear):
            store[new] = old.weight.detach().float().cpu().clone()
        orig(layer, nm, new)

    Q.set_ = set_
    try:
        yield store
    finally:
        Q.set_ = orig


def _fp_lookup(fp, name, mod):
    """fp weights of module `name`: fp is {module: W}, {name: W}, or a full-precision model."""
    if isinstance(fp, nn.Module):
        try:
            lin = fp.get_submodule(name)
        except AttributeError:
            return None
        return lin.weight.detach() if isinstance(lin, nn.Linear) else None
    w = fp.get(mod) if mod in fp else fp.get(name)
    return w


@torch.no_grad()
def collect_activations(model, calib: torch.Tensor, names, max_rows: int = 512):
    """Run calib tokens [n, L] through model, keep the inputs of modules `names`: {name: [T, K]}."""
    from ..models.llama import causal_mask
    n, L = calib.shape
    per = max(1, max_rows // n)
    out = {nm: [] for nm in names}
    hooks = []
    for nm in names:
        m = model.get_submodule(nm)
        hooks.append(m.register_forward_hook(
            lambda mod, a, o, nm=nm: out[nm].append(a[0].reshape(-1, a[0].shape[-1])[
                torch.linspace(0, a[0].shape[0] - 1, per).long()].float().cpu())))
    dev = model.device
    model.setup_cache(L)
    pos = torch.arange(L, device=dev)
    mask = causal_mask(0, L, L, device=dev)
    try:
        for row in calib:
            model(row.to(dev), pos, pos, mask, return_hidden=False, logits_rows=slice(L - 1, L))
    finally:
        for h in hooks:
            h.remove()
    return {nm: torch.cat(v) for nm, v in out.items()}


@torch.no_grad()
def compensate_model(model, fp, k_fraction: float | dict = 0.01, selector: str = "approx", calib=None,
                     bits: int | None = 4):
    """Wrap every decoder WQLinear of `model` in a CompensatedLinear (in place; returns model); a quantized
    lm_head (quantize_model(lm_head=True)) is left as it is.

    fp: full-precision weights ({WQLinear: W} from keep_fp_weights(), {module name: W}, or the fp
        model with the same module names - not valid after AWQ folding, use keep_fp_weights there).
    k_fraction: selected / input channels, or {projection: fraction} with projection in
        qkv_proj, o_proj, gate_up_proj, down_proj. calib: LongTensor [n, L] tokens (required by approx).
    """
    types = _quantized_types()
    targets = [(nm, m) for nm, m in model.named_modules() if isinstance(m, types) and nm != "lm_head"]
    if not targets:
        raise SpecqError("no weight-only quantized Linear (WQLinear) found: quantize the model first")
    stats = {}
    if selector == "approx":
        if calib is None:
            raise SpecqError("the approx selector needs calibration tokens (calib=...)")
        acts = collect_activations(model, calib, [nm for nm, _ in targets])
        stats = {nm: SEL.calib_stats(a) for nm, a in acts.items()}
    for nm, m in targets:
        W = _fp_lookup(fp, nm, m)
        if W is None:
            raise SpecqError(f"no full-precision weight for {nm}")
        if tuple(W.shape) != (m.out_features, m.in_features):
            raise SpecqError(f"full-precision weight of {nm} has shape {tuple(W.shape)}, expected "
                             f"{(m.out_features, m.in_features)}")
        res = Residual.from_weights(W, m.dequantize(), bits)
        frac = k_fraction.get(nm.rsplit(".", 1)[-1], 0.0) if isinstance(k_fraction, dict) else k_fraction
        cl = CompensatedLinear(m, res, k_chunk=SEL.k_chunk_for(m.in_features, frac), selector=selector,
                               stats=stats.get(nm))
        parent, _, leaf = nm.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, cl)
    return model


def compensated_modules(model):
    return [(nm, m) for nm, m in model.named_modules() if isinstance(m, CompensatedLinear)]


def set_k_fraction(model, k_fraction: float | dict):
    """Change k of every CompensatedLinear (float, or {projection: fraction})."""
    for nm, m in compensated_modules(model):
        frac = k_fraction.get(nm.rsplit(".", 1)[-1], 0.0) if isinstance(k_fraction, dict) else k_fraction
        m.set_k(SEL.k_chunk_for(m.in_features, frac))
    return model
