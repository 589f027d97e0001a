"""AWQ (Lin et al. 2023): protect salient input channels by scaling them up before quantization.

For linears sharing one input X [T, K] (e.g. q|k|v), search s = mean|X|^a (normalised), a in a grid
of `grid` points over [0, 1), minimising || X W^T - (X/s) Q(W*s)^T ||^2; the caller folds 1/s into the
previous op (RMSNorm weight, v rows, up rows). Then a per-group clipping search picks the range ratio
minimising the group's output error (W - Q(W)) X_g^T X_g (W - Q(W))^T, computed from per-group Gram
matrices (cheap: no full matmul per candidate).
"""
from __future__ import annotations

import torch

from . import pack as P


def fake_quant(W, bits, group_size, sym, clip=None):
    q, s, z = P.rtn(W, bits, group_size, sym, clip)
    return P.dequant(q, s, z)


def search_scale(W, X, bits, group_size, sym, grid=20, fq=None):
    """W [N, K] (fused rows of the linears), X [T, K] -> best s [K] (1 = no scaling wins)."""
    fq = fq or (lambda w: fake_quant(w, bits, group_size, sym))
    W, X = W.float(), X.float()
    ref = X @ W.t()
    xm = X.abs().mean(0).clamp(min=1e-5)
    best, best_s = float("inf"), torch.ones_like(xm)
    for i in range(grid):
        a = i / grid
        s = xm.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = (ref - (X / s) @ fq(W * s).t()).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


def search_clip(W, X, bits, group_size, sym, ratios=None):
    """Per-group clip ratio [N, K//G] for W [N, K] given inputs X [T, K]."""
    N, K = W.shape
    G = P.check_shape(K, bits, group_size)
    ng = K // G
    ratios = ratios or [1.0 - 0.05 * i for i in range(10)]
    Xg = X.float().view(-1, ng, G)
    Hg = torch.einsum("tgi,tgj->gij", Xg, Xg)              # [ng, G, G]
    Wf = W.float()
    best_err = torch.full((N, ng), float("inf"), device=W.device)
    best = torch.ones(N, ng, device=W.device)
    for r in ratios:
        clip = torch.full((N, ng), r, device=W.device)
        d = (Wf - fake_quant(Wf, bits, group_size, sym, clip)).view(N, ng, G)
        err = torch.einsum("ngi,gij,ngj->ng", d, Hg, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best
