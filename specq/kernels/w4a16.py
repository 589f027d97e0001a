"""W4A16 (int4 weights, bf16/fp16 activations) on CUDA: one Triton tensor-core kernel for M = 1..128.

y^T = W @ x^T: the weight tile [BN, 128 k] is the wide MMA operand and the M tokens the narrow one,
padded only to BM = 16 / 32 / 64 (one token costs about what 16 do). Per 128-k block each int16 half
of a word becomes, with shr + lop3 + one packed add per pair, four 16-bit floats q - z (lop3 puts the
nibble under a float exponent: MAGIC | q == MAGIC + q exactly); the block's fp32 dot result is scaled
by its group scale (PRESCALE: the scale is folded into the weights instead). Small M: K is split so
the grid fills the GPU; every split writes an fp32 partial and the last one to finish a tile (counted
with an atomic) adds them up and writes y: no zeroed buffer, no second kernel (it resets the counter).

Kernel layout (prepare_w4a16, once per weight, see repack_int4): the default "slices" layout makes
nibble j of a block's 32 halves one contiguous 32-k slice, so the dequantized registers are already
tl.dot operands (4 dots per block, no shared-memory round trip); "pairs" keeps 8 consecutive k per
word and joins the four results into one 128-k operand (slower on H100: kept for comparison).
Scales and zeros are stored per 128-k block, transposed: [K // 128, N] (per-channel is repeated). The words
are stored tile-major (tile_major, N % 64 == 0): each [64 rows, 128 k] block one contiguous 4 KB run, which
the H100 streams 3-14% faster than 64-byte pieces of 64 rows (bench/results/h100/kernels_w4a16_dev.txt).

Dynamic error compensation beside it (comp=Comp(...), specq.compensate): a second, small kernel on a side
stream, launched just before the GEMV, one program per (1024-channel chunk, CT output tiles, token tile):
it chooses each token row's salient channels of its chunk with the bucket top-k (the math of
specq.compensate.select.approx_topk), reads those rows of the 4-bit residual straight from pinned host memory
(mapped pointer, zero-copy) and writes x[S] @ R[S, cols] as one more fp32 split-K partial per chunk: each
counts as one more arrival on the output tile, so whichever program arrives last writes y = base +
compensation. No add kernel; its own launch keeps its registers off the GEMV's occupancy.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from ..errors import SpecqError
from .common import HAS_TRITON, INTERPRET, tl, triton, use_asm, use_triton
from .ref import SHIFTS, dequant_w4, unpack_int4



SLICES = True          # default word layout (see repack_int4)


class W4A16Weight(NamedTuple):
    qweight: torch.Tensor   # int32 [N, K//8] in the kernel layout (repack_int4)
    scales: torch.Tensor    # [K//128, N] activation dtype, one row per 128-k block
    zeros: torch.Tensor     # [K//128, N] activation dtype
    locks: torch.Tensor     # int32 [LOCKS] split-K tile counters (all zero between launches)
    group_size: int         # -1: not supported by the kernels (torch fallback)
    N: int
    K: int
    raw: tuple              # canonical (qweight, scales, zeros) kept for the fallback path
    slices: bool            # word layout (repack_int4): 4 dots of 32 k per block, else 1 dot of 128 k
    tiled: bool = False     # tile-major storage (tile_major): each [64 rows, 128 k] block is 4 KB contiguous


class Comp(NamedTuple):
    """Compensation operands for one launch (built by specq.compensate.kernel.fused)."""
    x: torch.Tensor         # [M, K] activations in the residual's channel order (before any column perm)
    thr: torch.Tensor       # float32 [n_chunks, NB] descending bucket thresholds per chunk (device)
    codes: object           # int32 [K, N // 8] residual codes in pinned host memory (or its mapped pointer)
    scales: torch.Tensor    # float32 [N] residual scales (device)
    chunk: int              # C channels per chunk (K = n_chunks * C)
    k_chunk: int            # channels chosen per chunk and token row


FUSE_MAX_M = 8             # compensation in the launch up to this many token rows (each row is selected in turn)
_SIDE: dict = {}
INTERP_COMP_FIRST = True   # interpreter only: which of the two kernels runs first (tests cover both)


def repack_int4(qweight: torch.Tensor, slices: bool) -> torch.Tensor:
    """Canonical qweight [N, K//8] -> kernel words (same shape). Word w of a 128-k block has two int16
    halves h = 0, 1 of four nibbles j each. pairs: k = 8w + 2j + h (a whole word is 8 consecutive k);
    slices: k = 32j + 2w + h (nibble j of the block's 32 halves is one contiguous 32-k dot operand)."""
    N, W = qweight.shape
    q = unpack_int4(qweight)                                             # [N, K]
    if slices:
        q = q.view(N, W // 16, 4, 16, 2).permute(0, 1, 3, 4, 2)          # [N, blk, w, h, j]
    else:
        q = q.view(N, W, 4, 2).transpose(2, 3)                           # [N, w, h, j]
    q = q.reshape(N, W, 8)                                               # nibble p = 4h + j
    w = (q.to(torch.int64) << SHIFTS.to(q.device, torch.int64)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).contiguous()


TILE_ROWS = 64
TILED = True           # default storage order (see tile_major)


def tile_major(words: torch.Tensor) -> torch.Tensor:
    """Kernel words [N, K//8] (N % 64 == 0) -> the same words stored block by block: [N/64, K/128, 64, 16]
    (flattened back to [N, K//8]), so the [64 rows, 128 k] tile a program reads per block is one contiguous
    4 KB run instead of 64 runs of 64 bytes two rows apart (DRAM row-buffer friendly)."""
    N, W = words.shape
    return words.view(N // TILE_ROWS, TILE_ROWS, W // 16, 16).transpose(1, 2).contiguous().view(N, W)


def prepare_w4a16(qweight, scales, zeros, group_size=None, dtype=None, slices=SLICES, tiled=None) -> W4A16Weight:
    """One-time repack of canonical int4 weights for w4a16_linear (dtype: activation dtype)."""
    N, W = qweight.shape
    K = W * 8
    G = K if group_size in (None, -1, 0) else int(group_size)
    if qweight.dtype != torch.int32 or scales.shape != (N, K // G) or zeros.shape != scales.shape or K % G:
        raise SpecqError(f"bad W4A16 tensors: qweight {tuple(qweight.shape)} {qweight.dtype}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group_size {group_size}")
    dtype = dtype or scales.dtype
    zf = zeros.float()
    # the dot path subtracts 128 + z (1024 + z for fp16) in 16-bit floats: exact for small integer zeros
    ok = K % 128 == 0 and G % 128 == 0 and bool(((zf == zf.round()) & (zf.abs() <= 64)).all())
    if not ok:
        e = torch.empty(0, device=qweight.device)
        return W4A16Weight(qweight, e, e, e, -1, N, K, (qweight, scales, zeros), slices)
    rep = G // 128
    s = scales.to(dtype).repeat_interleave(rep, dim=1).t().contiguous()            # [K//128, N]
    z = zeros.to(dtype).repeat_interleave(rep, dim=1).t().contiguous()
    locks = torch.zeros(_LOCKS, dtype=torch.int32, device=qweight.device)
    tiled = (TILED if tiled is None else tiled) and N % TILE_ROWS == 0
    words = repack_int4(qweight, slices)
    return W4A16Weight(tile_major(words) if tiled else words, s, z, locks, G, N, K, (qweight, scales, zeros),
                       slices, tiled)


_LOCKS = 4096          # tile counters per weight: n_tiles * m_tiles of a split launch must fit
_CACHE: dict = {}


def _prepared(qweight, scales, zeros, group_size, dtype) -> W4A16Weight:
    """prepare_w4a16 cached per qweight tensor (dropped when it dies or changes in place)."""
    key = (id(qweight), dtype)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == qweight._version and hit[2].raw[1] is scales:
        return hit[2]
    p = prepare_w4a16(qweight, scales, zeros, group_size, dtype)
    _CACHE[key] = (weakref.ref(qweight, lambda _, k=key: _CACHE and _CACHE.pop(k, None)), qweight._version, p)
    return p


# cfg = (BM, BN, SPLIT, R, num_warps, num_stages[, PRESCALE]): output tile BM tokens x BN rows, K
# split SPLIT ways, R 128-k blocks per loop step, PRESCALE: scale folded into the dequantized weights.
# Rule fitted to the H100 sweeps (bench/results/h100/kernels_w4a16_dev.txt, Llama-3-8B shapes): split K
# until the grid has `target` programs; 2 stages and 2 blocks per step for M <= 16; wide N (gate_up)
# above 16 tokens: 128-row tiles, 8 warps, scale folded into the weights; long K (down, K >= 3N): one
# block per step and, except at 17..32 tokens (slower there on the H100), twice the programs (tuned on the
# whole layer, bench/dev/layer_tune.py: 77.6 -> 75.1 us at M=1, 130.6 -> 124.2 at M=64).
def default_config(M: int, N: int, K: int):
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    wide = N >= 16384 and M > 16
    long_k = K >= 3 * N
    BN, nw, pre = (128, 8, True) if wide else (64, 4, False)
    R, ns = (2, 2) if M <= 16 and not long_k else (1, 3)
    target = (512 if M <= 16 else 384 if M <= 32 else 224) * (2 if long_k and not 16 < M <= 32 else 1)
    tiles = -(-N // BN) * -(-M // BM)
    split = 1
    while tiles * split < target and split < 16 and (K // 128) % (2 * split * R) == 0:
        split *= 2
    return (BM, BN, split, R, nw, ns, pre)


def w4a16_linear(x, qweight, scales=None, zeros=None, group_size=None, cfg=None, asm=None, comp: Comp | None = None):
    """y [..., N] = x [..., K] @ W^T. qweight is either a W4A16Weight (from prepare_w4a16) or the
    canonical int32 [N, K//8] tensor with scales / zeros [N, K//G] (repacked once and cached).
    float32 x (calibration, perplexity) takes the exact torch path: the kernels take 16-bit activations.
    comp: add the dynamic error compensation in the same launch (kernel path only; callers check fused_ok)."""
    w = qweight if isinstance(qweight, W4A16Weight) else _prepared(qweight, scales, zeros, group_size, x.dtype)
    if x.shape[-1] != w.K:
        raise SpecqError(f"w4a16_linear: x has K={x.shape[-1]}, weight has K={w.K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.K)
    if w.group_size > 0 and x2.dtype != w.scales.dtype:
        x2 = x2.to(w.scales.dtype)
    if w.group_size < 0 or not use_triton(x2) or x2.shape[0] == 0 or x2.dtype not in (torch.float16, torch.bfloat16):
        q, s, z = w.raw
        y = x2 @ dequant_w4(q, s, z).to(x2.dtype).T
        return y.to(x.dtype).reshape(*lead, w.N)
    y = _launch(x2.contiguous(), w, cfg, use_asm(x2) if asm is None else asm, comp)
    return y.to(x.dtype).reshape(*lead, w.N)


def fused_ok(x2: torch.Tensor, w: W4A16Weight) -> bool:
    """Can w4a16_linear(x2, w, comp=...) add the compensation in its launch for this input?"""
    return (w.group_size > 0 and use_triton(x2) and 0 < x2.shape[0] <= FUSE_MAX_M and w.N % 8 == 0
            and x2.dtype in (torch.float16, torch.bfloat16))


def _side(device):
    key = str(device)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=device)
    return _SIDE[key]


def _launch(x, w: W4A16Weight, cfg, asm, comp: Comp | None = None):
    M, K = x.shape
    N = w.N
    c = tuple(cfg or default_config(M, N, K))
    BM, BN, split, R, nw, ns, pre = c + (False,) * (7 - len(c))
    nblk = K // 128
    split = max(1, min(split, nblk // R))
    while nblk % (split * R):                          # every split: a whole number of R-block steps
        split -= 1
        if split == 0:
            split, R = 1, 1
    nch = K // comp.chunk if comp is not None else 0
    nslot = split + nch                                # fp32 partials per tile: K splits (+ one per chunk)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), split)
    if nslot > 1 and grid[0] * grid[1] > w.locks.numel():
        raise SpecqError(f"w4a16: {grid[0] * grid[1]} split-K tiles exceed the lock table ({w.locks.numel()})")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = torch.empty(nslot, M, N, dtype=torch.float32, device=x.device) if nslot > 1 else y
    gemv = lambda: _w4a16_kernel[grid](  # noqa: E731
        x, w.qweight.view(torch.int16), w.scales, w.zeros, y, ws, w.locks, M, N, K // 4, nblk // split, nslot,
        x.stride(0), y.stride(0), BM=BM, BN=BN, R=R, SPLITK=nslot > 1, SLICES=w.slices,
        TILED=w.tiled,
        PRESCALE=bool(pre) and w.slices, USE_ASM=asm, FP16=x.dtype == torch.float16, F32DOT=INTERPRET,
        num_warps=nw, num_stages=ns)
    if comp is None:
        gemv()
        return y
    C, KC = comp.chunk, comp.k_chunk
    CT = max(1, min(256, 4096 // triton.next_power_of_2(KC)) // BN)          # output tiles per comp program
    cgrid = (grid[0], triton.cdiv(grid[1], CT), nch)
    cx = comp.x
    launch_comp = lambda: _comp_kernel[cgrid](  # noqa: E731
        cx, cx.stride(0), comp.thr, comp.codes, comp.scales, ws, y, w.locks, M, N, split, nslot, y.stride(0),
        grid[0], grid[1], BM=BM, BN=BN, C=C, KC=KC, KCP=triton.next_power_of_2(KC), NB=comp.thr.shape[1], CT=CT,
        BLOCK_C=triton.next_power_of_2(C), num_warps=4)
    if not x.is_cuda:                                  # interpreter: one after the other (either order is valid)
        for f in ((launch_comp, gemv) if INTERP_COMP_FIRST else (gemv, launch_comp)):
            f()
        return y
    main = torch.cuda.current_stream(x.device)
    side = _side(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        launch_comp()
    gemv()
    main.wait_stream(side)                             # y is complete once both kernels have arrived
    if not torch.cuda.is_current_stream_capturing():
        for t in (ws, y, cx, comp.thr, comp.scales):
            t.record_stream(side)
    return y


def _w4_pairs_asm(fp16: bool, scale: bool = False) -> str:
    """$4: one word (two int16 units, pack=2); $5: -(MAGIC + z) packed pair. Output j = nibbles j and
    j + 4 of the word as a 16-bit float pair, minus z: lop3 puts the nibble under MAGIC's exponent
    (MAGIC | q == MAGIC + q exactly), one packed add removes MAGIC + z."""
    magic, one = ("0x64006400", "0x3C003C00") if fp16 else ("0x43004300", "0x3F803F80")
    sfx = "f16x2" if fp16 else "bf16x2"
    lines = ["{", ".reg .b32 t, one, nzero;", f"mov.b32 one, {one};", "mov.b32 nzero, 0x80008000;"]
    for j in range(4):
        if j:
            lines.append(f"shr.b32 t, $4, {4 * j};")
        lines.append(f"lop3.b32 t, {'t' if j else '$4'}, 0x000F000F, {magic}, 0xEA;")
        if scale:   # $6: scale pair; (q - z) exact, then one rounding of (q - z) * s
            lines.append(f"fma.rn.{sfx} t, t, one, $5;")
            lines.append(f"fma.rn.{sfx} ${j}, t, $6, nzero;")
        else:
            lines.append(f"fma.rn.{sfx} ${j}, t, one, $5;")
    lines.append("}")
    return "\n".join(lines)


if HAS_TRITON:
    W4P_BF16 = tl.constexpr(_w4_pairs_asm(False))
    W4P_FP16 = tl.constexpr(_w4_pairs_asm(True))
    W4PS_BF16 = tl.constexpr(_w4_pairs_asm(False, True))
    W4PS_FP16 = tl.constexpr(_w4_pairs_asm(True, True))

    @triton.jit
    def _dq4(u, nz, sc, USE_ASM: tl.constexpr, FP16: tl.constexpr, PRESCALE: tl.constexpr):
        """u int16 [BN, U] -> four [BN, U] 16-bit float tensors: nibble j of each half, minus z
        (times the scale sc [BN] if PRESCALE)."""
        if USE_ASM and PRESCALE:
            nzb = tl.broadcast_to(nz[:, None], u.shape)
            sb = tl.broadcast_to(sc.to(nz.dtype)[:, None], u.shape)
            if FP16:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(W4PS_FP16, "=r,=r,=r,=r,r,r,r", [u, nzb, sb],
                                                           dtype=(tl.float16,) * 4, is_pure=True, pack=2)
            else:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(W4PS_BF16, "=r,=r,=r,=r,r,r,r", [u, nzb, sb],
                                                           dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
        elif USE_ASM:
            nzb = tl.broadcast_to(nz[:, None], u.shape)
            if FP16:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(W4P_FP16, "=r,=r,=r,=r,r,r", [u, nzb],
                                                           dtype=(tl.float16,) * 4, is_pure=True, pack=2)
            else:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(W4P_BF16, "=r,=r,=r,=r,r,r", [u, nzb],
                                                           dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
        else:  # plain path (interpreter, SPECQ_NO_ASM=1)
            zf = (nz.to(tl.float32) + (1024.0 if FP16 else 128.0))[:, None]     # nz = -(MAGIC + z)
            sf = sc[:, None] if PRESCALE else 1.0
            ui = u.to(tl.int32)
            o0 = (((ui & 0xF).to(tl.float32) + zf) * sf).to(nz.dtype)
            o1 = ((((ui >> 4) & 0xF).to(tl.float32) + zf) * sf).to(nz.dtype)
            o2 = ((((ui >> 8) & 0xF).to(tl.float32) + zf) * sf).to(nz.dtype)
            o3 = ((((ui >> 12) & 0xF).to(tl.float32) + zf) * sf).to(nz.dtype)
        return o0, o1, o2, o3

    @triton.jit
    def _pairs_join(o0, o1, o2, o3):
        """pairs layout: half e = 2w + h of o_j holds k = 8w + 2j + h -> [BN, 4U] in k order."""
        BN: tl.constexpr = o0.shape[0]
        U: tl.constexpr = o0.shape[1]
        t = tl.join(tl.join(o0, o1), tl.join(o2, o3))                      # [BN, U, 2(j0), 2(j1)]
        t = tl.reshape(t, [BN, U // 2, 2, 2, 2])                           # [BN, w, h, j0, j1]
        t = tl.permute(t, [0, 1, 4, 3, 2])                                 # [BN, w, j1, j0, h]
        return tl.reshape(t, [BN, U * 4])

    @triton.jit
    def _dot(a, b, acc, F32DOT: tl.constexpr):
        if F32DOT:   # the interpreter's bf16 dot is wrong: do it in fp32 there
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _block(acc, u_ptr, s_ptr, z_ptr, x_ptr, b, rowoff, BSTRIDE: tl.constexpr, rnl, rm, mmask, N, sxm,
               SLICES: tl.constexpr,
               PRESCALE: tl.constexpr, USE_ASM: tl.constexpr, FP16: tl.constexpr, F32DOT: tl.constexpr):
        """acc [BN, BM] += s * ((q - z) [BN, 128] @ x[:, 128 b : 128 b + 128]^T) for 128-k block b."""
        ru = tl.arange(0, 32)                                                     # 32 int16 units
        rk = tl.arange(0, 128)
        u = tl.load(u_ptr + rowoff[:, None] + (b * BSTRIDE + ru)[None, :])         # [BN, 32] int16
        s = tl.load(s_ptr + b * N + rnl).to(tl.float32)                               # [BN]
        z = tl.load(z_ptr + b * N + rnl).to(tl.float32)
        nz = (-(z + (1024.0 if FP16 else 128.0))).to(x_ptr.dtype.element_ty)
        o0, o1, o2, o3 = _dq4(u, nz, s, USE_ASM, FP16, PRESCALE)                       # [BN, 32] each
        xb = x_ptr + rm[None, :] * sxm + b * 128
        if PRESCALE:  # scaled weights: accumulate in place (slices layout)
            acc = _dot(o0, tl.load(xb + ru[:, None], mask=mmask[None, :], other=0.0), acc, F32DOT)
            acc = _dot(o1, tl.load(xb + (32 + ru)[:, None], mask=mmask[None, :], other=0.0), acc, F32DOT)
            acc = _dot(o2, tl.load(xb + (64 + ru)[:, None], mask=mmask[None, :], other=0.0), acc, F32DOT)
            return _dot(o3, tl.load(xb + (96 + ru)[:, None], mask=mmask[None, :], other=0.0), acc, F32DOT)
        if SLICES:   # o_j = k slice 32j..32j+31 of the block
            part = _dot(o0, tl.load(xb + ru[:, None], mask=mmask[None, :], other=0.0), None, F32DOT)
            part = _dot(o1, tl.load(xb + (32 + ru)[:, None], mask=mmask[None, :], other=0.0), part, F32DOT)
            part = _dot(o2, tl.load(xb + (64 + ru)[:, None], mask=mmask[None, :], other=0.0), part, F32DOT)
            part = _dot(o3, tl.load(xb + (96 + ru)[:, None], mask=mmask[None, :], other=0.0), part, F32DOT)
        else:        # pairs: interleave the four into k order, one dot
            wt = _pairs_join(o0, o1, o2, o3)                                            # [BN, 128]
            part = _dot(wt, tl.load(xb + rk[:, None], mask=mmask[None, :], other=0.0), None, F32DOT)
        return acc + part * s[:, None]

    @triton.jit
    def _finish(ws_ptr, y_ptr, rm, rn, omask, M, N, sym, NSLOT):
        """y[rm, rn] = sum of the NSLOT fp32 partials of this tile (cast to y's dtype)."""
        tot = tl.load(ws_ptr + rm[None, :] * N + rn[:, None], mask=omask, other=0.0, cache_modifier=".cg")
        for sp in range(1, NSLOT):
            tot += tl.load(ws_ptr + (sp * M + rm[None, :]) * N + rn[:, None], mask=omask, other=0.0,
                           cache_modifier=".cg")
        tl.store(y_ptr + rm[None, :] * sym + rn[:, None], tot.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _pick(xv, thr_ptr, c, C: tl.constexpr, KC: tl.constexpr, KCP: tl.constexpr, NB: tl.constexpr,
              BLOCK_C: tl.constexpr):
        """Chunk c of one token row, xv float32 [BLOCK_C] -> (channel offsets [KCP] in the chunk, x there [KCP]):
        exactly KC channels by bucket top-k (select.approx_topk's math), in channel order; slots >= KC are 0.
        Few block-wide steps (latency is what counts here): one histogram, one scan, two 2-D reductions."""
        offs = tl.arange(0, BLOCK_C)
        valid = offs < C
        a = tl.abs(xv)
        lo = tl.zeros([BLOCK_C], dtype=tl.int32)                     # bucket = number of thresholds above |x|:
        hi = tl.full([BLOCK_C], NB, tl.int32)                        # binary search in the descending row
        for _ in tl.static_range(8):                                 # enough for NB < 256
            mid = (lo + hi) // 2
            t = tl.load(thr_ptr + c * NB + tl.minimum(mid, NB - 1))  # gathers from one 128-byte row (L1)
            gt = (a < t) & (mid < hi)
            lo = tl.where(gt, mid + 1, lo)
            hi = tl.where(gt | (mid >= hi), hi, mid)
        bucket = lo
        NBP: tl.constexpr = 2 * NB                                   # bins 0..NB used (NB a power of 2)
        hist = tl.histogram(bucket, NBP, mask=valid)                 # [NBP]
        le = tl.cumsum(hist, axis=0)                                 # channels in buckets <= b
        bb = tl.arange(0, NBP)
        bstar = tl.sum((le < KC).to(tl.int32), axis=0)               # first bucket where the count reaches KC
        above = tl.sum(tl.where(bb < bstar, hist, 0), axis=0)        # taken whole
        top = (bucket < bstar) & valid
        inb = (bucket == bstar) & valid
        cs = tl.cumsum(top.to(tl.int32) * 65536 + inb.to(tl.int32), axis=0)
        rank = cs & 65535                                            # 1-based rank in the boundary bucket
        need = KC - above
        sel = top | (inb & (rank <= need))
        slot = (cs >> 16) + tl.minimum(rank, need) - 1               # chosen channels before this one
        hit = sel[:, None] & (slot[:, None] == tl.arange(0, KCP)[None, :])     # [BLOCK_C, KCP]
        idx = tl.sum(tl.where(hit, offs[:, None], 0), axis=0)
        xs = tl.sum(tl.where(hit, xv[:, None], 0.0), axis=0)
        return idx, xs

    @triton.jit
    def _comp_kernel(cx_ptr, sxc, thr_ptr, codes_ptr, rs_ptr, ws_ptr, y_ptr, lock_ptr, M, N, SLOT0, NSLOT, sym,
                     M_TILES, N_TILES, BM: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, KC: tl.constexpr,
                     KCP: tl.constexpr, NB: tl.constexpr, CT: tl.constexpr, BLOCK_C: tl.constexpr):
        """Chunk c = program_id(2), output tiles CT*pid .. CT*pid + CT - 1, token tile pid_m: ws slot SLOT0 + c =
        x[S_c] @ R[S_c, cols] per token row (S_c: the row's KC channels of chunk c), then one arrival on each tile
        (the last arrival writes y)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1) * CT
        c = tl.program_id(2)
        CW8: tl.constexpr = CT * BN // 8
        cols = pid_n * BN + tl.arange(0, CT * BN)
        cm = cols < N
        wv = pid_n * (BN // 8) + tl.arange(0, CW8)         # residual words of these columns (8 columns each)
        rs = tl.load(rs_ptr + cols, mask=cm, other=0.0)
        jv = tl.arange(0, KCP) < KC
        offs = tl.arange(0, BLOCK_C)
        sh = tl.arange(0, 8) * 4
        m0 = pid_m * BM
        for m in range(m0, tl.minimum(m0 + BM, M)):
            xv = tl.load(cx_ptr + m * sxc + c * C + offs, mask=offs < C, other=0.0).to(tl.float32)
            idx, xs = _pick(xv, thr_ptr, c, C, KC, KCP, NB, BLOCK_C)
            rows = (c * C + idx).to(tl.int64)
            words = tl.load(codes_ptr + rows[:, None] * (N // 8) + wv[None, :],
                            mask=jv[:, None] & (wv < N // 8)[None, :], other=0)   # [KCP, CW8]: each word once
            q = ((words[:, :, None] >> sh[None, None, :]) & 15).to(tl.float32) - 8.0  # [KCP, CW8, 8]
            part = tl.reshape(tl.sum(xs[:, None, None] * q, axis=0), [CT * BN])      # column 8w + j
            tl.store(ws_ptr + ((SLOT0 + c) * M + m) * N + cols, part * rs, mask=cm)
        tl.debug_barrier()                                 # every thread's partial is written before the counts
        for t in range(0, CT):
            tn = pid_n + t
            if tn < N_TILES:
                lock = lock_ptr + tn * M_TILES + pid_m
                if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == NSLOT - 1:
                    rn = tn * BN + tl.arange(0, BN)
                    rm = m0 + tl.arange(0, BM)
                    _finish(ws_ptr, y_ptr, rm, rn, (rn < N)[:, None] & (rm < M)[None, :], M, N, sym, NSLOT)
                    tl.atomic_xchg(lock, 0)

    @triton.jit(do_not_specialize=["M", "PER", "SPLIT"])
    def _w4a16_kernel(x_ptr, u_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, lock_ptr, M, N, KU, PER, SPLIT, sxm, sym,
                      # SPLIT: fp32 partials per tile (K splits pid_k < grid z, + one per chunk of the compensation)
                      BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr, SPLITK: tl.constexpr,
                      SLICES: tl.constexpr, PRESCALE: tl.constexpr, USE_ASM: tl.constexpr, FP16: tl.constexpr,
                      F32DOT: tl.constexpr, TILED: tl.constexpr):
        pid_m = tl.program_id(0)          # m fastest: programs sharing a weight tile run together
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BN + tl.arange(0, BN)
        rnl = rn % N                      # in-bounds rows for loads; stores are masked
        # tile_major: block b of row n at ((n // 64) * K/128 + b) * 64 + n % 64 (2048 int16 units per block)
        BSTRIDE: tl.constexpr = 2048 if TILED else 32
        rowoff = (rnl // 64) * (KU * 64) + (rnl % 64) * 32 if TILED else rnl * KU
        rm = pid_m * BM + tl.arange(0, BM)
        mmask = rm < M
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        for i in range(0, PER, R):        # PER = 128-k blocks of this split, a multiple of R
            b = pid_k * PER + i
            for r in tl.static_range(R):
                acc = _block(acc, u_ptr, s_ptr, z_ptr, x_ptr, b + r, rowoff, BSTRIDE, rnl, rm, mmask, N, sxm,
                             SLICES, PRESCALE, USE_ASM, FP16, F32DOT)
        omask = (rn < N)[:, None] & mmask[None, :]
        if not SPLITK:
            tl.store(y_ptr + rm[None, :] * sym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(ws_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=omask)
            tl.debug_barrier()            # every thread's partial is written before the count
            lock = lock_ptr + pid_n * tl.num_programs(0) + pid_m
            if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                _finish(ws_ptr, y_ptr, rm, rn, omask, M, N, sym, SPLIT)
                tl.atomic_xchg(lock, 0)
