"""Group-parameter search and refit for weight-only formats (same format, better numbers).

search_params: per group, the (scale, integer zero) minimising the group's output error
  d^T H_g d (d = w - Q(w), H_g = the group's diagonal block of the input Hessian X^T X), or plain
  ||d||^2 without H. Candidates shrink the group range: symmetric absmax * r; asymmetric
  (lo * r_lo, hi * r_hi), searched coordinate-wise. Like GPTQ's `mse` option / AWQ's clip search,
  but scored by the layer output error and with independent ends for the asymmetric grid.
refit_scales: with the codes and zeros fixed (e.g. after GPTQ), the per-group scales of each row
  minimising the whole row's output error (w - w_hat)^T H (w - w_hat): a [K/G x K/G] least squares.
"""
from __future__ import annotations

import torch

from . import pack as P


def group_blocks(H: torch.Tensor, G: int) -> torch.Tensor:
    """H [K, K] -> its diagonal blocks [K/G, G, G] float32."""
    K = H.shape[0]
    ng = K // G
    Hb = H.float().view(ng, G, ng, G)
    return torch.stack([Hb[g, :, g] for g in range(ng)])


@torch.no_grad()
def search_params(W, bits, group_size, sym, H=None, n=16, lo=0.6, rows=2048):
    """W [N, K] -> scales, zeros [N, K//G] float32 (zeros integer valued).

    Symmetric: absmax * r for r in linspace(1, lo, n). Asymmetric: both ends shrunk by the same r,
    then the low end alone, then the high end alone (coordinate search, 3n candidates per group)."""
    N, K = W.shape
    G = P.check_shape(K, bits, group_size)
    ng, maxq = K // G, (1 << bits) - 1
    Hg = group_blocks(H, G) if H is not None else None            # [ng, G, G]
    rs = torch.linspace(1.0, lo, n).tolist()
    best_s = torch.empty(N, ng, device=W.device)
    best_z = torch.empty(N, ng, device=W.device)
    for r0 in range(0, N, rows):                                    # bound memory on big matrices
        Wg = W[r0:r0 + rows].float().view(-1, ng, G)                # [n, ng, G]
        if sym:
            amax = Wg.abs().amax(-1)
            wlo, whi = -amax, amax
        else:
            wlo, whi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)

        def params(a, b):                                           # shrink factors [n, ng] -> scale, zero
            if sym:
                return 2 * amax * a / maxq, torch.full_like(a, float(1 << (bits - 1)))
            s = (whi * b - wlo * a) / maxq
            s = torch.where(s > 0, s, torch.ones_like(s))
            return s, torch.round(-wlo * a / s).clamp(0, maxq)

        def err(a, b):
            s, z = params(a, b)
            s = torch.where(s > 0, s, torch.ones_like(s))
            d = Wg - (P.quant_codes(Wg, s, z, bits) - z[..., None]) * s[..., None]
            return torch.einsum("ngi,gij,ngj->ng", d, Hg, d) if Hg is not None else d.pow(2).sum(-1)

        one = torch.ones(Wg.shape[:2], device=W.device)
        a_b, b_b, e_b = one.clone(), one.clone(), err(one, one)
        stages = [("both",)] if sym else [("both",), ("lo",), ("hi",)]
        for (which,) in stages:
            a0, b0 = a_b.clone(), b_b.clone()
            for r in rs[1:]:
                a = a0 if which == "hi" else one * r
                b = b0 if which == "lo" else one * r
                e = err(a, b)
                better = e < e_b
                e_b = torch.where(better, e, e_b)
                a_b, b_b = torch.where(better, a, a_b), torch.where(better, b, b_b)
        s, z = params(a_b, b_b)
        best_s[r0:r0 + rows] = torch.where(s > 0, s, torch.ones_like(s))
        best_z[r0:r0 + rows] = z
    return best_s, best_z


@torch.no_grad()
def refit_scales(W, H, codes, zeros, scales, ridge=1e-6, rows=256):
    """W [N, K] (the target weight), H [K, K], codes [N, K], zeros/scales [N, K//G] -> new scales.

    Row n: minimise (w - A s)^T H (w - A s) with A[k, g] = (q[k] - z[g]) on group g's columns."""
    N, K = W.shape
    ng = scales.shape[1]
    G = K // ng
    Hf = H.double()
    out = torch.empty(N, ng, device=W.device)
    for r0 in range(0, N, rows):
        Qt = (codes[r0:r0 + rows].double().view(-1, ng, G) - zeros[r0:r0 + rows].double()[..., None])  # [n, ng, G]
        HA = torch.einsum("khl,nhl->nkh", Hf.view(K, ng, G), Qt)                           # [n, K, ng]
        M = torch.einsum("ngi,ngih->ngh", Qt, HA.view(-1, ng, G, ng))                         # [n, ng, ng]
        rhs = torch.einsum("nkl,nkl->nk", (W[r0:r0 + rows].double() @ Hf).view(-1, ng, G), Qt)  # [n, ng]
        M = M + ridge * M.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(ng, dtype=M.dtype, device=M.device)
        s = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
        old = scales[r0:r0 + rows].double()
        out[r0:r0 + rows] = torch.where(s > 0, s, old).float()                               # keep the sign convention
    return out
