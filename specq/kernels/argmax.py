"""Argmax over the last dim of fp32 rows in one launch (CUDA; the greedy decode step).

    out [R] int64 = x.argmax(-1)      x [R, V] float32 contiguous, R <= MAX_ROWS

ATen's reduce kernel takes 27 us on the H100 for [1, 128256] fp32 logits (torch.compile'd: 23.6 us). Here each
row is split into NB chunks (3.2 us on the H100, bench/dev/argmax_ab.py) of whole BLOCKs, one program per (row, chunk) in one launch: a program writes its
chunk's (max, first index of the max) to a scratch buffer, then bumps the row's counter (tl.atomic_add, acq_rel);
the program that arrives last reduces the NB partials to out[r] and sets the counter back to 0, ready for the
next call or CUDA-graph replay. Exact torch.argmax semantics (greedy decoding stays bit-identical): the first
index among equal maxima, NaN above everything (the first NaN wins). Under torch.compile it is one opaque op
(torch.ops.specq.argmax). argmax_ref is the reference (and the CPU path); SPECQ_NO_ARGMAX=1 forces it (A/B).

Assumption: the per-device counters are shared by every call, so calls must not run concurrently on different
streams (one stream at a time: the decode loop, graph capture and its replays all qualify).
"""
from __future__ import annotations

import os

import torch

from .common import HAS_TRITON, INTERPRET, pdl_launch, tl, triton

NO_ARGMAX = os.environ.get("SPECQ_NO_ARGMAX", "0") == "1"    # A/B switch: torch's argmax instead
BLOCK = 1024                # elements per step of a program (4 warps: 8 per thread)
MAX_NB = 256                # chunks per row at most (more blocks: several per chunk)
MAX_ROWS = 64               # rows the kernel takes (more: argmax_ref)
BIG = 2**31 - 1             # "no index" (indices are int32 inside the kernel)
_counters: dict[torch.device, torch.Tensor] = {}       # device -> int32 [MAX_ROWS], all zero between calls


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference: x [..., V] -> [...] int64."""
    return x.argmax(-1)


def usable(x: torch.Tensor) -> bool:
    """fp32, contiguous, at least one dim, 1 <= V < 2**31, 1..MAX_ROWS rows (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return (HAS_TRITON and not NO_ARGMAX and (x.is_cuda or INTERPRET) and x.dtype == torch.float32 and x.dim() >= 1
            and x.is_contiguous() and 0 < x.shape[-1] < BIG and 0 < x.numel() // x.shape[-1] <= MAX_ROWS)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [..., V] -> [...] int64, equal to x.argmax(-1); the kernel where usable(x), else the reference."""
    if not usable(x):
        return argmax_ref(x)
    if torch.compiler.is_compiling():
        return torch.ops.specq.argmax(x)
    return _run(x)


def _zeroed_counters(dev: torch.device) -> torch.Tensor:
    """The device's cached counters (made on first use). Nothing runs while a CUDA graph is captured, so a buffer
    made then would hold garbage outside the graph: a capture that finds none gets a fresh zeroed one (a memset
    node of the graph), not cached."""
    c = _counters.get(dev)
    if c is None:
        c = torch.zeros(MAX_ROWS, dtype=torch.int32, device=dev)
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return c
        _counters[dev] = c
    return c


def _run(x: torch.Tensor) -> torch.Tensor:
    V = x.shape[-1]
    R = x.numel() // V
    bl = max(16, min(BLOCK, triton.next_power_of_2(V)))
    nblk = -(-V // bl)
    per = -(-nblk // MAX_NB)                 # blocks per chunk
    nb = -(-nblk // per)                     # chunks per row; every chunk holds at least one element
    out = torch.empty(R, dtype=torch.int64, device=x.device)
    if nb == 1:                              # one chunk: the program writes out[r] itself
        pv = pi = cnt = out
    else:
        pv = torch.empty(R * nb, dtype=torch.float32, device=x.device)      # partial maxima [R, NB]
        pi = torch.empty(R * nb, dtype=torch.int32, device=x.device)        # their first indices [R, NB]
        cnt = _zeroed_counters(x.device)
    P, kw = pdl_launch(x.device)
    _argmax_kernel[(R, nb)](x, out, pv, pi, cnt, V, per * bl, BLOCK=bl, NBP=max(2, triton.next_power_of_2(nb)),
                            ONE=nb == 1, PDL=P, num_warps=4, **kw)
    return out.view(x.shape[:-1])


if HAS_TRITON:
    from .common import pdl_enter
    _BIG = tl.constexpr(BIG)

    @triton.jit
    def _pick(v, i):
        """Lanes v [N] float32, i [N] int32 (each lane: its value and that value's first index; BIG = none) ->
        torch's argmax of the whole: the first NaN if any, else the first index of the max. (value, index)."""
        isn = v != v
        nan_i = tl.min(tl.where(isn, i, _BIG), axis=0)
        w = tl.where(isn, float("-inf"), v)
        m = tl.max(w, axis=0)
        best = tl.min(tl.where(w == m, i, _BIG), axis=0)
        has_nan = nan_i < _BIG
        return tl.where(has_nan, float("nan"), m), tl.where(has_nan, nan_i, best)

    @triton.jit
    def _argmax_kernel(x_ptr, out_ptr, pv_ptr, pi_ptr, cnt_ptr, V, CHUNK, BLOCK: tl.constexpr, NBP: tl.constexpr,
                       ONE: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)
        r = tl.program_id(0)                 # row
        b = tl.program_id(1)                 # chunk: elements [b * CHUNK, b * CHUNK + CHUNK) of the row
        nb = tl.num_programs(1)
        row = x_ptr + r.to(tl.int64) * V
        offs = tl.arange(0, BLOCK)
        bv = tl.full([BLOCK], float("-inf"), tl.float32)     # per lane: best value so far, its index
        bi = tl.full([BLOCK], _BIG, tl.int32)
        end = tl.minimum(b * CHUNK + CHUNK, V)
        for s0 in range(b * CHUNK, end, BLOCK):
            idx = s0 + offs
            inb = idx < end
            x = tl.load(row + idx, mask=inb, other=float("-inf"))
            # later indices win only by being larger, or NaN over non-NaN; a lane's first element always
            take = inb & ((x > bv) | ((x != x) & (bv == bv)) | (bi == _BIG))
            bv = tl.where(take, x, bv)
            bi = tl.where(take, idx, bi)
        v, i = _pick(bv, bi)
        if ONE:
            tl.store(out_ptr + r, i.to(tl.int64))
        else:
            tl.store(pv_ptr + r * nb + b, v)
            tl.store(pi_ptr + r * nb + b, i)
            tl.debug_barrier()               # the partial is written before the counter says so
            seen = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel")
            if seen == nb - 1:               # last of the row: every partial is visible (read them from L2)
                k = tl.arange(0, NBP)
                km = k < nb
                pv = tl.load(pv_ptr + r * nb + k, mask=km, other=float("-inf"), cache_modifier=".cg")
                pi = tl.load(pi_ptr + r * nb + k, mask=km, other=_BIG, cache_modifier=".cg")
                _, i = _pick(pv, pi)
                tl.store(out_ptr + r, i.to(tl.int64))
                tl.store(cnt_ptr + r, 0)     # ready for the next launch (same stream)


@torch.library.custom_op("specq::argmax", mutates_args=())
def _argmax_op(x: torch.Tensor) -> torch.Tensor:
    return _run(x) if usable(x) else argmax_ref(x)


@_argmax_op.register_fake
def _(x):
    return x.new_empty(x.shape[:-1], dtype=torch.int64)
