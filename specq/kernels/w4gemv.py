"""W4A16 split-K GEMV on CUDA cores (no tensor cores) for M = 1..8 tokens: y [M, N] = x [M, K] @ W^T.

Kernel layout (prepare_gemv, once per weight): one int32 word holds the 4-bit codes of EIGHT ROWS at
ONE k: word (kq, c, i) nibble j = q[8c + j, 4kq + i]. Words are stored [K//4, N//8, 4] ("flat": a
quad-row kq is N/2 contiguous words; a thread's 16-byte vector = 8 rows x 4 consecutive k) or in
panels of P rows [N//P, K//4, P//8, 4] ("panelP": one tile's whole K sweep is one contiguous run).
Scale and zero of a row and group are packed in one int32 sz [K//G, N] (low half: scale bits, high
half: zero bits, both in the activation dtype).

Math. Nibble j is moved (3 shifts per word: w << 11, w >> 1, w >> 13) to a 4-bit field at bit
p_j in {11, 15, 19} of a float32 mantissa, and one lop3 (mask | exponent) makes it a float:
    v_j = bitcast((w_shifted & (0xF << p_j)) | MAGIC_j) = R_j + q      (exactly; R_j = 2^(23 - p_j))
with R = 4096, 256, 16. The inner loop is then only lop3 + FMA: acc_j += v_j * x_k (fp32). Per group
g and row (X0 = sum of the x's this thread multiplied):
    sum_k (q - z) x s = s * acc - s * (R_j + z) * X0
so the offset R_j and the zero cost one FMA per row and group, never per weight. (R_j <= 4096 keeps
the fp32 cancellation error near 1e-5 relative; scales / zeros may be any floats.)

Program = BLOCK_N rows (BNC = BLOCK_N/8 word columns) x K/SPLIT k. Tile = [QK quads, BNC columns, 4
k] words, QK = 32 * num_warps / BNC so every thread loads one 16-byte vector per tile; U tiles per
iteration (BLOCK_K = 4 * QK * U k). The M tokens are a small [MP] axis (MP = M
rounded up to a power of 2, <= 8) held in registers: the weights are read once for all tokens. The
QK partials are summed once at the end; SPLIT partials either go through an fp32 workspace where the
last program of a tile (atomic counter) sums them and writes y (deterministic), or are atomically
added into a persistent zeroed fp32 buffer that the last program reads, converts and re-zeroes
(ATOMIC). Either way one kernel launch per matmul; the counters are back at zero after each launch.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from ..errors import SpecqError
from .common import HAS_TRITON, tl, triton, use_asm, use_triton
from .ref import dequant_w4, unpack_int4

R_J = (4096.0, 256.0, 16.0, 4096.0, 256.0, 16.0, 4096.0, 256.0)   # float offset of nibble j's field
MAX_M = 8              # tokens per launch (larger M is cut into chunks of 8)
_LOCKS = 4096          # tile counters per weight (N / BLOCK_N must fit)


class GemvWeight(NamedTuple):
    qweight: torch.Tensor   # int32 [K*N/8] words, flat [K//4, N//8, 4] or panels [N//P, K//4, P//8, 4]
    sz: torch.Tensor        # int32 [K//G, N]: scale bits | zero bits << 16 (activation dtype)
    buf: torch.Tensor       # fp32 [MAX_M * N] ATOMIC split-K accumulator (all zero between launches)
    locks: torch.Tensor     # int32 [_LOCKS] split-K tile counters (all zero between launches)
    group_size: int         # G (= K per channel)
    N: int
    K: int
    panel: int              # rows per panel (N: flat layout)
    dtype: torch.dtype      # activation dtype the scales were packed for
    raw: tuple              # canonical (qweight, scales, zeros) for the torch fallback


class GemvConfig(NamedTuple):
    block_n: int = 256      # rows per program (multiple of 64, power of 2)
    block_k: int = 128      # k per loop iteration (= G for grouped weights)
    split: int = 8          # K splits (grid axis 1)
    num_warps: int = 4
    num_stages: int = 1
    atomic: bool = False    # split-K reduction: False = fp32 workspace + last-program sum


def pack_gemv_words(qweight: torch.Tensor, panel: int) -> torch.Tensor:
    """Canonical qweight int32 [N, K//8] -> kernel words int32 [K*N/8]: word (kq, c, i) nibble j holds
    q[8c + j, 4kq + i]; panels of `panel` rows are stored one after the other (panel == N: flat)."""
    N, W = qweight.shape
    K = W * 8
    q = unpack_int4(qweight).view(N // panel, panel // 8, 8, K // 4, 4)     # [p, c, j, kq, i]
    q = q.permute(0, 3, 1, 4, 2)                                             # [p, kq, c, i, j]
    w = torch.zeros(q.shape[:-1], dtype=torch.int64, device=q.device)
    for j in range(8):
        w |= q[..., j].to(torch.int64) << (4 * j)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).reshape(-1).contiguous()


def pack_sz(scales: torch.Tensor, zeros: torch.Tensor, dtype) -> torch.Tensor:
    """scales, zeros [N, K//G] -> int32 [K//G, N]: low 16 bits scale, high 16 bits zero (dtype bits)."""
    s = scales.to(dtype).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    z = zeros.to(dtype).contiguous().view(torch.int16).to(torch.int32)
    return (s | (z << 16)).t().contiguous()


def parse_layout(layout: str, N: int) -> int:
    """'flat' -> N; 'panelP' -> P (rows per panel)."""
    if layout == "flat":
        return N
    if layout.startswith("panel") and layout[5:].isdigit():
        P = int(layout[5:])
        if P % 64 or N % P:
            raise SpecqError(f"gemv layout {layout}: panel must be a multiple of 64 dividing N={N}")
        return P
    raise SpecqError(f"unknown gemv layout {layout!r} (flat or panelP)")


def prepare_gemv(qweight, scales, zeros, group_size=None, dtype=None, layout="flat") -> GemvWeight:
    """One-time repack of canonical int4 weights (ref.py layout) for gemv_linear."""
    N, W = qweight.shape
    K = W * 8
    G = K if group_size in (None, -1, 0) else int(group_size)
    if (qweight.dtype != torch.int32 or K % G or scales.shape != (N, K // G) or zeros.shape != scales.shape
            or N % 64 or G % 16):
        raise SpecqError(f"bad gemv weight: qweight {tuple(qweight.shape)} {qweight.dtype}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group_size {group_size} "
                         "(needs N % 64 == 0, G % 16 == 0)")
    dtype = dtype or scales.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise SpecqError(f"gemv: activation dtype {dtype} (bf16 / fp16 only)")
    panel = parse_layout(layout, N)
    dev = qweight.device
    return GemvWeight(pack_gemv_words(qweight, panel), pack_sz(scales, zeros, dtype),
                      torch.zeros(MAX_M * N, dtype=torch.float32, device=dev),
                      torch.zeros(_LOCKS, dtype=torch.int32, device=dev), G, N, K, panel, dtype,
                      (qweight, scales, zeros))


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def default_gemv_config(M: int, N: int, K: int, G: int = 128) -> GemvConfig:
    """256-row tiles of 4 warps (64 rows for tiny N); split K until the grid has ~4 programs per SM
    of a 132-SM GPU (fewer for many tokens: more registers per program)."""
    bn = 256 if N >= 2048 else 64
    nw = 4 if bn == 256 else 2
    target = 528 if M <= 2 else 400 if M <= 4 else 264
    tiles = -(-N // bn)
    return GemvConfig(bn, min(G, 128) if G < K else 128, _pick_split(tiles, K, G, min(G, 128), target), nw,
                      1, False)


def _pick_split(tiles, K, G, block_k, target):
    """Largest useful split with tiles * split <= ~target whose K slice is a whole number of groups
    (or lies inside one group) and of block_k iterations."""
    best = 1
    for s in range(1, 65):
        if not _split_ok(K, G, block_k, s):
            continue
        if tiles * s <= target or best == 1 and tiles * s <= 2 * target:
            best = s
    return best


def _split_ok(K, G, block_k, s):
    if K % s:
        return False
    ks = K // s
    if ks % block_k:
        return False
    return ks % G == 0 and block_k == G if ks > G else G % ks == 0


_CACHE: dict = {}


def _prepared(qweight, scales, zeros, group_size, dtype) -> GemvWeight:
    """prepare_gemv cached per qweight tensor (dropped when it dies or changes in place)."""
    key = (id(qweight), dtype)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == qweight._version and hit[2].raw[1] is scales:
        return hit[2]
    p = prepare_gemv(qweight, scales, zeros, group_size, dtype)
    _CACHE[key] = (weakref.ref(qweight, lambda _, k=key: _CACHE and _CACHE.pop(k, None)), qweight._version, p)
    return p


def gemv_linear(x, w, cfg=None, asm=None, scales=None, zeros=None, group_size=None):
    """y [..., N] = x [..., K] @ W^T in x's dtype. w: a GemvWeight, or the canonical qweight with
    scales / zeros (repacked once and cached). cfg: GemvConfig / tuple or None (default_gemv_config).
    Without a GPU (and outside TRITON_INTERPRET=1) or for fp32 x: the plain torch path."""
    if not isinstance(w, GemvWeight):
        w = _prepared(w, scales, zeros, group_size, x.dtype if x.dtype in (torch.float16, torch.bfloat16)
                      else scales.dtype)
    if x.shape[-1] != w.K:
        raise SpecqError(f"gemv_linear: x has K={x.shape[-1]}, weight has K={w.K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.K)
    if x2.dtype != w.dtype or not use_triton(x2) or x2.shape[0] == 0:
        q, s, z = w.raw
        y = (x2.float() @ dequant_w4(q, s, z).T).to(x.dtype)
        return y.reshape(*lead, w.N)
    x2 = x2.contiguous()
    asm = use_asm(x2) if asm is None else bool(asm)
    ys = [_launch(x2[i:i + MAX_M], w, cfg, asm) for i in range(0, x2.shape[0], MAX_M)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    return y.reshape(*lead, w.N)


def resolve_config(M, w: GemvWeight, cfg):
    """cfg (or the default) made valid for this weight: (BN, BK, split, nw, ns, atomic, QK, U, grouped)."""
    c = GemvConfig(*cfg) if cfg is not None else default_gemv_config(M, w.N, w.K, w.group_size)
    bn, bk, split, nw, ns, atomic = c
    bnc = bn // 8
    if bn % 64 or bnc & (bnc - 1) or bn > w.panel or w.panel % bn:
        raise SpecqError(f"gemv: block_n {bn} must be a power of 2 >= 64 dividing the panel ({w.panel})")
    qk = max(1, 32 * nw // bnc)
    G, K = w.group_size, w.K
    if G < K and bk != G:
        bk = G                                      # grouped: one group per iteration
    split = max(1, min(split, K // bk))
    while not _split_ok(K, G, bk, split):
        split -= 1
    u = bk // (4 * qk)
    if u < 1 or bk % (4 * qk):
        raise SpecqError(f"gemv: block_k {bk} is not a multiple of 4 * {qk} quads (block_n {bn}, {nw} warps)")
    grouped = K // split > G
    return bn, bk, split, nw, ns, bool(atomic), qk, u, grouped


def _launch(x, w: GemvWeight, cfg, asm):
    M, K = x.shape
    N = w.N
    bn, bk, split, nw, ns, atomic, qk, u, grouped = resolve_config(M, w, cfg)
    grid = (triton.cdiv(N, bn), split)
    if split > 1 and grid[0] > w.locks.numel():
        raise SpecqError(f"gemv: {grid[0]} tiles exceed the lock table ({w.locks.numel()})")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if split > 1 and not atomic:
        ws = torch.empty(split * M * N, dtype=torch.float32, device=x.device)
    else:
        ws = w.buf
    pc = w.panel // 8                                # word columns per panel
    _gemv_kernel[grid](x.view(torch.int32), w.qweight, w.sz, y, ws, w.locks,
                       M, N, N // 8, K // (split * bk), split, w.group_size, x.stride(0) // 2, y.stride(0),
                       K // 4 * pc * 4, pc * 4, pc,
                       MP=_pow2(M), BNC=bn // 8, QK=qk, U=u, GROUPED=grouped, SPLITK=split > 1,
                       ATOMIC=atomic, USE_ASM=asm, FP16=x.dtype == torch.float16,
                       num_warps=nw, num_stages=ns)
    return y


# one word -> 8 float32 R_j + nibble j: three shifts put the nibbles at bits 11 / 15 / 19, one lop3
# ((a & mask) | magic, immLut 0xEA) per nibble makes the float (see the module docstring)
_NIB_ASM = "\n".join([
    "{", ".reg .b32 a, b, c;",
    "shl.b32 a, $8, 11;", "shr.u32 b, $8, 1;", "shr.u32 c, $8, 13;",
    "lop3.b32 $0, a, 0x7800, 0x45800000, 0xEA;", "lop3.b32 $1, a, 0x78000, 0x43800000, 0xEA;",
    "lop3.b32 $2, a, 0x780000, 0x41800000, 0xEA;",
    "lop3.b32 $3, b, 0x7800, 0x45800000, 0xEA;", "lop3.b32 $4, b, 0x78000, 0x43800000, 0xEA;",
    "lop3.b32 $5, b, 0x780000, 0x41800000, 0xEA;",
    "lop3.b32 $6, c, 0x7800, 0x45800000, 0xEA;", "lop3.b32 $7, c, 0x78000, 0x43800000, 0xEA;",
    "}"])


if HAS_TRITON:
    NIB_ASM = tl.constexpr(_NIB_ASM)

    @triton.jit
    def _nib8(w, USE_ASM: tl.constexpr):
        """w int32 [...] -> 8 float32 [...]: v_j = R_j + nibble j (R = 4096, 256, 16, 4096, ...)."""
        if USE_ASM:
            return tl.inline_asm_elementwise(NIB_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w],
                                             dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            a = w << 11
            b = w >> 1
            c = w >> 13                         # arithmetic shift: the sign bits land outside the masks
            v0 = ((a & 0x7800) | 0x45800000).to(tl.float32, bitcast=True)
            v1 = ((a & 0x78000) | 0x43800000).to(tl.float32, bitcast=True)
            v2 = ((a & 0x780000) | 0x41800000).to(tl.float32, bitcast=True)
            v3 = ((b & 0x7800) | 0x45800000).to(tl.float32, bitcast=True)
            v4 = ((b & 0x78000) | 0x43800000).to(tl.float32, bitcast=True)
            v5 = ((b & 0x780000) | 0x41800000).to(tl.float32, bitcast=True)
            v6 = ((c & 0x7800) | 0x45800000).to(tl.float32, bitcast=True)
            v7 = ((c & 0x78000) | 0x43800000).to(tl.float32, bitcast=True)
            return v0, v1, v2, v3, v4, v5, v6, v7

    @triton.jit
    def _lo16(p, FP16: tl.constexpr):
        """Low 16 bits of int32 p as a float32 (bf16 / fp16 bits)."""
        if FP16:
            return (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            return (p << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _hi16(p, FP16: tl.constexpr):
        """High 16 bits of int32 p as a float32 (bf16 / fp16 bits)."""
        if FP16:
            return (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            return (p & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _fma8(a0, a1, a2, a3, a4, a5, a6, a7, w, xi, USE_ASM: tl.constexpr):
        """a_j [MP, QK, BNC] += v_j * xi for the 8 rows of each word w [QK, BNC]; xi [MP, QK, 1]."""
        v0, v1, v2, v3, v4, v5, v6, v7 = _nib8(w, USE_ASM)
        a0 += v0[None, :, :] * xi
        a1 += v1[None, :, :] * xi
        a2 += v2[None, :, :] * xi
        a3 += v3[None, :, :] * xi
        a4 += v4[None, :, :] * xi
        a5 += v5[None, :, :] * xi
        a6 += v6[None, :, :] * xi
        a7 += v7[None, :, :] * xi
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _tile(a0, a1, a2, a3, a4, a5, a6, a7, xs, wp, xp, xmask,
              USE_ASM: tl.constexpr, FP16: tl.constexpr):
        """One [QK quads, BNC columns, 4 k] word tile (wp: its int32 pointers) times the x pairs at xp
        [MP, QK, 1, 2]; xs [MP, QK, 1] += the x's used."""
        QK: tl.constexpr = wp.shape[0]
        BNC: tl.constexpr = wp.shape[1]
        w = tl.load(wp)                                             # [QK, BNC, 4]: one 16 B vector
        e, o = tl.split(tl.reshape(w, [QK, BNC, 2, 2]))            # e: i = 0, 2; o: i = 1, 3
        w0, w2 = tl.split(e)
        w1, w3 = tl.split(o)
        p01, p23 = tl.split(tl.load(xp, mask=xmask, other=0))      # [MP, QK, 1] int32: k pairs
        x0 = _lo16(p01, FP16)
        x1 = _hi16(p01, FP16)
        x2 = _lo16(p23, FP16)
        x3 = _hi16(p23, FP16)
        a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, w0, x0, USE_ASM)
        a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, w1, x1, USE_ASM)
        a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, w2, x2, USE_ASM)
        a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, w3, x3, USE_ASM)
        return a0, a1, a2, a3, a4, a5, a6, a7, xs + ((x0 + x1) + (x2 + x3))

    @triton.jit
    def _corr(o, a, xs, szp, R: tl.constexpr, FP16: tl.constexpr):
        """o += s * a - s * (R + z) * xs for one nibble row: szp [BNC] pointers to its packed s|z."""
        p = tl.load(szp)
        s = _lo16(p, FP16)[None, None, :]
        z = _hi16(p, FP16)[None, None, :]
        return o + s * a - (s * (R + z)) * xs

    @triton.jit
    def _corr8(o0, o1, o2, o3, o4, o5, o6, o7, a0, a1, a2, a3, a4, a5, a6, a7, xs, szp,
               FP16: tl.constexpr):
        """Group correction of all 8 nibble rows (szp [BNC]: pointers to row 8c of the group's sz)."""
        o0 = _corr(o0, a0, xs, szp + 0, 4096.0, FP16)
        o1 = _corr(o1, a1, xs, szp + 1, 256.0, FP16)
        o2 = _corr(o2, a2, xs, szp + 2, 16.0, FP16)
        o3 = _corr(o3, a3, xs, szp + 3, 4096.0, FP16)
        o4 = _corr(o4, a4, xs, szp + 4, 256.0, FP16)
        o5 = _corr(o5, a5, xs, szp + 5, 16.0, FP16)
        o6 = _corr(o6, a6, xs, szp + 6, 4096.0, FP16)
        o7 = _corr(o7, a7, xs, szp + 7, 256.0, FP16)
        return o0, o1, o2, o3, o4, o5, o6, o7

    @triton.jit
    def _join8(o0, o1, o2, o3, o4, o5, o6, o7):
        """8 tensors [A, B, C] -> [A, B, C, 8] with o_j at index j (4p + 2q + r after three joins)."""
        e = tl.join(tl.join(o0, o4), tl.join(o2, o6))              # [..., p, q] = o_{4p + 2q}
        d = tl.join(tl.join(o1, o5), tl.join(o3, o7))              # o_{4p + 2q + 1}
        t = tl.join(e, d)                                          # [..., p, q, r] = o_{4p + 2q + r}
        return tl.reshape(t, [o0.shape[0], o0.shape[1], o0.shape[2], 8])

    @triton.jit(do_not_specialize=["M", "ITERS", "SPLIT"])
    def _gemv_kernel(x_ptr, q_ptr, sz_ptr, y_ptr, ws_ptr, lock_ptr,
                     M, N, NC, ITERS, SPLIT, G, sxm, sym, PSTRIDE, QSTRIDE, PC,
                     MP: tl.constexpr, BNC: tl.constexpr, QK: tl.constexpr, U: tl.constexpr,
                     GROUPED: tl.constexpr, SPLITK: tl.constexpr, ATOMIC: tl.constexpr,
                     USE_ASM: tl.constexpr, FP16: tl.constexpr):
        # x_ptr: int32 view [M, K/2] (k pairs), row stride sxm; q_ptr: words; sz_ptr: int32 [K/G, N]
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        BK: tl.constexpr = 4 * QK * U
        rq = tl.arange(0, QK)
        rc = tl.arange(0, BNC)
        rm = tl.arange(0, MP)
        colg = (pid_n * BNC + rc) % NC                              # [BNC] word column (8 rows each)
        coff = (colg // PC) * PSTRIDE + (colg % PC) * 4             # its offset in the panel layout
        k0 = pid_k * ITERS * BK
        wp = q_ptr + (k0 // 4 + rq)[:, None, None] * QSTRIDE + coff[None, :, None] \
            + tl.arange(0, 4)[None, None, :]                        # [QK, BNC, 4]
        xp = x_ptr + rm[:, None, None, None] * sxm + (k0 // 2 + 2 * rq)[None, :, None, None] \
            + tl.arange(0, 2)[None, None, None, :]                  # [MP, QK, 1, 2]
        xmask = (rm < M)[:, None, None, None]
        szp = sz_ptr + (k0 // G) * N + 8 * colg                     # [BNC]
        z3 = tl.zeros([MP, QK, BNC], dtype=tl.float32)
        o0, o1, o2, o3, o4, o5, o6, o7 = z3, z3, z3, z3, z3, z3, z3, z3
        a0, a1, a2, a3, a4, a5, a6, a7 = z3, z3, z3, z3, z3, z3, z3, z3
        xs = tl.zeros([MP, QK, 1], dtype=tl.float32)
        for it in range(ITERS):
            if GROUPED:   # one group per iteration: fresh partial sums, corrected at its end
                a0, a1, a2, a3, a4, a5, a6, a7 = z3, z3, z3, z3, z3, z3, z3, z3
                xs = tl.zeros([MP, QK, 1], dtype=tl.float32)
            for t in tl.static_range(U):
                a0, a1, a2, a3, a4, a5, a6, a7, xs = _tile(
                    a0, a1, a2, a3, a4, a5, a6, a7, xs, wp + t * QK * QSTRIDE, xp + t * 2 * QK, xmask,
                    USE_ASM, FP16)
            if GROUPED:
                o0, o1, o2, o3, o4, o5, o6, o7 = _corr8(o0, o1, o2, o3, o4, o5, o6, o7,
                                                        a0, a1, a2, a3, a4, a5, a6, a7, xs, szp, FP16)
                szp += N
            wp += U * QK * QSTRIDE
            xp += BK // 2
        if not GROUPED:   # the whole K slice lies in one group
            o0, o1, o2, o3, o4, o5, o6, o7 = _corr8(o0, o1, o2, o3, o4, o5, o6, o7,
                                                    a0, a1, a2, a3, a4, a5, a6, a7, xs, szp, FP16)
        tot = tl.sum(_join8(o0, o1, o2, o3, o4, o5, o6, o7), axis=1)      # [MP, BNC, 8]: row 8c + j
        tot = tl.reshape(tot, [MP, BNC * 8])
        rn = pid_n * BNC * 8 + tl.arange(0, BNC * 8)
        rmo = tl.arange(0, MP)
        omask = (rmo < M)[:, None] & (rn < N)[None, :]
        if not SPLITK:
            tl.store(y_ptr + rmo[:, None] * sym + rn[None, :], tot.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            lock = lock_ptr + pid_n
            if ATOMIC:    # ws_ptr: persistent zeroed fp32 [8, N]; the last program reads and re-zeroes it
                tl.atomic_add(ws_ptr + rmo[:, None] * N + rn[None, :], tot, mask=omask, sem="relaxed")
                tl.debug_barrier()
                if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                    wsp = ws_ptr + rmo[:, None] * N + rn[None, :]
                    tot = tl.load(wsp, mask=omask, other=0.0, cache_modifier=".cg")
                    tl.store(y_ptr + rmo[:, None] * sym + rn[None, :], tot.to(y_ptr.dtype.element_ty),
                             mask=omask)
                    tl.store(wsp, tl.zeros_like(tot), mask=omask)
                    tl.atomic_xchg(lock, 0)
            else:         # ws_ptr: fp32 [SPLIT, M, N] partials; the last program adds the others' to its own
                tl.store(ws_ptr + (pid_k * M + rmo[:, None]) * N + rn[None, :], tot, mask=omask)
                tl.debug_barrier()
                if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                    for sp0 in range(0, SPLIT, 4):
                        for d in tl.static_range(4):
                            sp = sp0 + d
                            ok = (sp < SPLIT) & (sp != pid_k)
                            tot += tl.load(ws_ptr + (sp * M + rmo[:, None]) * N + rn[None, :],
                                           mask=omask & ok, other=0.0, cache_modifier=".cg")
                    tl.store(y_ptr + rmo[:, None] * sym + rn[None, :], tot.to(y_ptr.dtype.element_ty),
                             mask=omask)
                    tl.atomic_xchg(lock, 0)
