"""Shared bits of the Triton kernels: availability, the one-time int4 repack, inline-PTX dequantizers."""
from __future__ import annotations

import os

import torch

from . import pdl
from .ref import SHIFTS, unpack_int4

try:  # CI has no GPU and may have no triton: everything else in specq.kernels still works
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    _HAS_GDC = HAS_TRITON and hasattr(tl.extra.cuda, "gdc_wait")
except Exception:  # pragma: no cover - depends on the triton version
    _HAS_GDC = False


def version(t: torch.Tensor) -> int:
    """t's in-place version counter (cache keys of prepared weights); inference-mode tensors keep none: -1."""
    try:
        return t._version
    except RuntimeError:        # "Inference tensors do not track version counter"
        return -1


def use_triton(x: torch.Tensor) -> bool:
    """Run a Triton kernel for this input? (CUDA tensors, or any tensor under TRITON_INTERPRET=1)."""
    return HAS_TRITON and (x.is_cuda or INTERPRET)


def pdl_launch(device) -> tuple[bool, dict]:
    """(PDL flag, extra launch kwargs) for specq's Triton kernels on this device: programmatic dependent launch
    (specq.kernels.pdl.enabled) where this triton has griddepcontrol (tl.extra.cuda.gdc_wait, triton >= 3.3)."""
    on = HAS_TRITON and pdl.enabled(device) and _HAS_GDC
    return on, ({"launch_pdl": True} if on else {})


def use_asm(x: torch.Tensor) -> bool:
    """Packed inline-PTX dequantization: real GPUs only (the interpreter cannot run PTX)."""
    return x.is_cuda and not INTERPRET and os.environ.get("SPECQ_NO_ASM", "0") != "1"


def interleave_int4(qweight: torch.Tensor, chunk: int, xor: int = 0) -> torch.Tensor:
    """Canonical qweight [N, K//8] -> kernel layout [N, K//8]: blocks of 8*chunk k's; inside a block
    nibble j of word w holds k = chunk*j + w, so nibble j of `chunk` adjacent words is one contiguous
    k-slice (a tl.dot operand). `xor` is applied to every code (8: unsigned q -> two's complement q-8)."""
    N, W = qweight.shape
    K = W * 8
    q = unpack_int4(qweight) ^ xor                          # [N, K]
    q = q.view(N, K // (8 * chunk), 8, chunk).transpose(2, 3)   # [N, blocks, w, j]
    q = q.to(torch.int64) << SHIFTS.to(q.device, torch.int64)
    w = q.sum(-1).reshape(N, W)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).contiguous()


if HAS_TRITON:
    # Two int32 words a=$8, b=$9 (pack=2) -> 8 outputs, output j = nibble j of (a, b) as two 16-bit
    # floats (a low, b high), dequantized: (q - z) * s with packed half2 math. $10 = s (packed pair),
    # $11 = -(MAGIC + z) (packed pair). MAGIC|q as a 16-bit float equals MAGIC + q exactly.
    def _w4_asm(fp16: bool) -> str:
        magic, one, sfx = ("0x64006400", "0x3C003C00", "f16x2") if fp16 else ("0x43004300", "0x3F803F80", "bf16x2")
        lines = ["{", ".reg .b32 t, u, one, nzero;", f"mov.b32 one, {one};", "mov.b32 nzero, 0x80008000;"]
        for j in range(8):
            bj = j // 2
            sel = bj | (bj << 4) | ((4 + bj) << 8) | ((4 + bj) << 12)
            lines.append(f"prmt.b32 t, $8, $9, {sel:#x};")
            if j % 2:
                lines.append("shr.b32 t, t, 4;")
            lines.append(f"lop3.b32 u, t, 0x000F000F, {magic}, 0xEA;")
            lines.append(f"fma.rn.{sfx} u, u, one, $11;")
            lines.append(f"fma.rn.{sfx} ${j}, u, $10, nzero;")
        lines.append("}")
        return "\n".join(lines)

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """First statement of a kernel launched with launch_pdl=PDL (specq.kernels.pdl): wait until the previous
        kernel of the stream has finished and its writes are visible, then let the next launch begin. Nothing
        else may touch global memory before it."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    W4_ASM_BF16 = tl.constexpr(_w4_asm(False))
    W4_ASM_FP16 = tl.constexpr(_w4_asm(True))

    # Four int32 words $8..$11 (pack=4; two's complement nibbles) -> 8 int8 outputs; output j holds
    # 16 * c_j of each word (the nibble placed in the byte's high half keeps its sign: no extension).
    def _w4i8_asm() -> str:
        lines = ["{", ".reg .b32 t, u, v;"]
        for bj in range(4):
            lines.append(f"prmt.b32 u, $8, $9, {(bj | ((4 + bj) << 4)):#x};")     # bytes bj of a, b
            lines.append(f"prmt.b32 v, $10, $11, {(bj | ((4 + bj) << 4)):#x};")   # bytes bj of c, d
            lines.append("prmt.b32 t, u, v, 0x5410;")                           # [a, b, c, d]
            lines.append(f"shl.b32 u, t, 4;")
            lines.append(f"and.b32 ${2 * bj}, u, 0xF0F0F0F0;")
            lines.append(f"and.b32 ${2 * bj + 1}, t, 0xF0F0F0F0;")
        lines.append("}")
        return "\n".join(lines)

    W4I8_ASM = tl.constexpr(_w4i8_asm())

    @triton.jit
    def dq8_asm(words, s, nz, FP16: tl.constexpr):
        """words int32 [A, B], s / nz [A, 1] or [A, B] -> 8 tensors [A, B] of dequantized nibbles."""
        if FP16:
            return tl.inline_asm_elementwise(W4_ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, s, nz],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(W4_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, s, nz],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)

    @triton.jit
    def i4_to_i8x16_asm(words):
        """words int32 [A, B] (two's complement nibbles) -> 8 int8 tensors: 16 * nibble j."""
        return tl.inline_asm_elementwise(W4I8_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words],
                                         dtype=(tl.int8,) * 8, is_pure=True, pack=4)
