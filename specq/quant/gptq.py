"""GPTQ (Frantar et al. 2022): quantize W column by column, spreading each column's rounding error
over the not-yet-quantized columns with the inverse Hessian H = X^T X of the layer's inputs.

Damping 0.01 * mean(diag H); lazy block updates of `block` columns; optional act-order (columns in
decreasing diag(H)) with static groups (group parameters fixed from the unpermuted weight, so the
canonical contiguous-group layout is kept).
"""
from __future__ import annotations

import torch

from . import pack as P


def hessian_add(H, x, x2=None):
    """Accumulate x^T x (or x^T x2) of x [T, K] into H [K, K] (float64; each call's product in float32,
    2-4x faster on CPU and as exact as the inputs for the windows used here). Returns H."""
    xf = x.reshape(-1, x.shape[-1]).float()
    x2 = xf if x2 is None else x2.reshape(-1, x2.shape[-1]).float()
    return H.add_(xf.t() @ x2)


def gptq(W, H, bits, group_size, sym=True, act_order=False, block=128, damp=0.01, params=None, init=None):
    """W [N, K], H [K, K] -> codes uint8 [N, K], scales, zeros float32 [N, K//G].

    params(w_group [N, G]) -> (scale [N], zero [N]) overrides the group quantizer (W4A8 two-level).
    init: (scales, zeros) [N, K//G] fixes the group parameters up front (static groups), e.g. from
    specq.quant.search.search_params."""
    N, K = W.shape
    G = P.check_shape(K, bits, group_size)
    maxq = (1 << bits) - 1
    params = params or (lambda wg: P.group_params(wg, bits, sym))
    W = W.detach().float().clone()
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    ng = K // G
    scales = torch.empty(N, ng, device=W.device)
    zeros = torch.empty(N, ng, device=W.device)
    static = init is not None or act_order or G == K or G > block
    if init is not None:
        scales.copy_(init[0]), zeros.copy_(init[1])
    elif static:
        for g in range(ng):
            scales[:, g], zeros[:, g] = params(W[:, g * G:(g + 1) * G])
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros(N, K, device=W.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()                         # [N, B]
        E1 = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // G
            if not static and col % G == 0:
                scales[:, g], zeros[:, g] = params(W1[:, i:i + G])
            s, z = scales[:, g], zeros[:, g]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            Q[:, col] = q
            err = (w - (q - z) * s) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes.to(torch.uint8), scales, zeros
