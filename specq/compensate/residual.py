"""Quantized residual R = W - dequant(Q(W)), stored transposed in (pinned) host memory.

Layout (one row per input channel, so a salient channel is one contiguous read):
  codes int32 [K, N//8]: nibble j (bits 4j..4j+3) of word w holds the unsigned code of R[8w+j, k] (0..15)
  scales float32 [N]: per output channel, symmetric: R[n, k] ~= (code - 8) * scales[n]
The scale is chosen by an MSE search over clipping ratios of max|R[n, :]|.
bits=None keeps R exactly (float32 [K, N], `dense`) - for tests and reference runs.
The codes are pinned (page-locked, mappable by the GPU) when CUDA is available; they never go to the GPU.
"""
from __future__ import annotations

import torch

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)   # nibble j at bit 4j
RATIOS = torch.linspace(0.3, 1.0, 36)                # clipping ratios tried by the MSE search


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def sym4_scales(R: torch.Tensor, ratios=RATIOS, rows: int = 1024) -> torch.Tensor:
    """R [N, K] -> per-row scale [N] minimising ||R - Q(R)||^2 over clip ratios (4-bit, codes -8..7)."""
    R = R.float()
    amax = R.abs().amax(1).clamp(min=1e-12)                      # [N]
    best, best_err = amax / 7, torch.full_like(amax, float("inf"))
    for r in ratios.tolist():
        s = amax * r / 7
        err = torch.empty_like(amax)
        for i in range(0, R.shape[0], rows):                      # bound memory on big matrices
            Ri, si = R[i:i + rows], s[i:i + rows, None]
            err[i:i + rows] = (Ri - torch.clamp(torch.round(Ri / si), -8, 7) * si).pow(2).sum(1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """Unsigned codes q [K, N] (0..15) -> int32 [K, N//8]."""
    K, N = q.shape
    w = (q.to(torch.int64).view(K, N // 8, 8) << SHIFTS.to(q.device)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack_rows(w: torch.Tensor) -> torch.Tensor:
    """int32 [..., N//8] -> codes int64 [..., N]."""
    v = (w.to(torch.int64) & 0xFFFFFFFF)[..., None] >> SHIFTS.to(w.device)
    return (v & 15).flatten(-2)


class Residual:
    """Host-side residual of one Linear. Not an nn.Module buffer on purpose: model.to(cuda) leaves it."""

    def __init__(self, codes=None, scales=None, dense=None):
        self.codes, self.scales, self.dense = codes, scales, dense
        self.K, self.N = (dense.shape if dense is not None else (codes.shape[0], codes.shape[1] * 8))
        self._dev_scales = {}
        self._full = None

    @property
    def bits(self):
        return None if self.dense is not None else 4

    @classmethod
    def from_weights(cls, W_fp: torch.Tensor, W_q: torch.Tensor, bits: int | None = 4) -> "Residual":
        """W_fp, W_q [N, K] (the full-precision and the dequantized quantized weight)."""
        R = W_fp.detach().float().cpu() - W_q.detach().float().cpu()          # [N, K]
        if bits is None:
            return cls(dense=_pin(R.t().contiguous()))
        if bits != 4:
            raise ValueError("residuals are stored in 4 bits (or exactly: bits=None)")
        if R.shape[0] % 8:
            raise ValueError(f"output dimension {R.shape[0]} must be a multiple of 8")
        s = sym4_scales(R)                                                     # [N]
        q = torch.clamp(torch.round(R / s[:, None]), -8, 7) + 8                # [N, K] in 0..15
        return cls(codes=_pin(pack_rows(q.t().contiguous())), scales=s)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows idx [...] (input channels) -> float32 [..., N] (on CPU)."""
        idx = idx.cpu()
        if self.dense is not None:
            return self.dense[idx]
        return (unpack_rows(self.codes[idx]) - 8).float() * self.scales

    def full(self) -> torch.Tensor:
        """Dequantized R^T float32 [K, N] (cached, host memory): the reference path gathers long inputs' rows from
        it. Never copied to the GPU whole: a GPU input takes only its selected rows (CompensatedLinear.correction)."""
        if self._full is None:
            self._full = self.dense if self.dense is not None else self.rows(torch.arange(self.K))
        return self._full

    def drop_cache(self):
        self._full = None

    def scales_on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._dev_scales:
            self._dev_scales[key] = self.scales.to(device)
        return self._dev_scales[key]

    def host_bytes(self) -> int:
        t = self.dense if self.dense is not None else self.codes
        return t.numel() * t.element_size()
