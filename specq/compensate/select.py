"""Choosing the salient input channels of each token row from its activations.

exact:  top-k of |x| over all K channels (the reference).
approx: chunked-bucket top-k (DecDEC). K is split into n equal chunks of C <= 1024 channels; each
        chunk has B descending thresholds t_0 > ... > t_{B-1} calibrated offline. Bucket b holds
        |x| in [t_b, t_{b-1}) (bucket 0: >= t_0, bucket B: below t_{B-1}). Every channel of the
        buckets above the one where the running count reaches k_chunk is taken; that boundary
        bucket fills the rest in channel order. No sort, only compares and prefix sums.
Both return idx long [M, k] (k = n * k_chunk), one salient set per token row.
"""
from __future__ import annotations

import torch

MAX_CHUNK = 1024
N_BUCKETS = 32
KEEP_TOP = 128       # order statistics kept per chunk from calibration (enough for k_chunk <= 64)


def chunking(K: int) -> tuple[int, int]:
    """-> (n chunks, chunk size C): the fewest equal chunks of at most 1024 channels."""
    n = -(-K // MAX_CHUNK)
    while K % n:
        n += 1
    return n, K // n


def k_chunk_for(K: int, k_fraction: float) -> int:
    """Channels per chunk for a fraction of the K input channels (0 -> 0, else at least 1)."""
    if k_fraction <= 0:
        return 0
    n, C = chunking(K)
    return max(1, min(C, round(k_fraction * C)))


def exact_topk(x: torch.Tensor, k: int) -> torch.Tensor:  # x [M, K] -> idx [M, k]
    return x.abs().topk(k, dim=1, sorted=False).indices


def calib_stats(xs: torch.Tensor, keep: int = KEEP_TOP) -> torch.Tensor:
    """Calibration activations xs [T, K] -> the `keep` largest |x| per chunk, descending: [T, n, keep]."""
    n, C = chunking(xs.shape[1])
    a = xs.float().abs().view(-1, n, C)
    return a.topk(min(keep, C), dim=2).values


def thresholds(stats: torch.Tensor, k_chunk: int, B: int = N_BUCKETS) -> torch.Tensor:
    """stats [T, n, keep] -> thresholds [n, B] float32, descending per chunk.

    Placed at quantiles of the order statistics ranked k/2 .. 2k over the calibration tokens, so the
    buckets are narrow where the k-th largest value usually falls."""
    T, n, keep = stats.shape
    lo, hi = max(0, k_chunk // 2 - 1), min(keep, 2 * k_chunk + 1)
    pool = stats[:, :, lo:hi].permute(1, 0, 2).reshape(n, -1).float()          # [n, T*(hi-lo)]
    q = torch.linspace(0, 1, B + 2)[1:-1]
    t = torch.quantile(pool, q, dim=1).t()                                     # [n, B] ascending
    return t.flip(1).contiguous()


def approx_topk(x: torch.Tensor, thr: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """x [M, K], thr [n, B] descending -> idx [M, n*k_chunk] (exactly k_chunk per chunk)."""
    M, K = x.shape
    n, B = thr.shape
    C = K // n
    a = x.abs().float().view(M, n, C).transpose(0, 1).reshape(n, M * C)          # [n, M*C]
    asc = thr.to(a.device).flip(1).contiguous()
    bucket = B - torch.searchsorted(asc, a.contiguous(), right=True)            # 0 = top bucket
    bucket = bucket.view(n, M, C).transpose(0, 1)                                # [M, n, C]
    hist = torch.zeros(M, n, B + 1, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, bucket, torch.ones_like(bucket))
    cum = hist.cumsum(2)                                                         # [M, n, B+1]
    bstar = (cum < k_chunk).sum(2, keepdim=True)                                 # boundary bucket
    above = torch.gather(cum, 2, (bstar - 1).clamp(min=0)) * (bstar > 0)         # taken whole
    need = k_chunk - above                                                       # [M, n, 1]
    inb = bucket == bstar
    rank = inb.cumsum(2)                                                         # 1-based in bucket
    sel = (bucket < bstar) | (inb & (rank <= need))                              # exactly k_chunk
    cols = sel.reshape(M, K).nonzero()[:, 1]
    return cols.view(M, n * k_chunk)


def recall(idx: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean fraction of each row's reference set found in idx (both [M, k])."""
    hit = (idx[:, :, None] == ref[:, None, :]).any(1).float()
    return hit.mean().item()
