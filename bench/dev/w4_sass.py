"""Compile specq's W4A16 kernel for sm_90 on any machine (no GPU: triton.compile with a GPUTarget, the bundled
ptxas / cuobjdump) and print, per config, shared memory and the order of the memory ops and MMAs in the SASS:
a = cp.async (LDGSTS), W = 16-byte global load, s = 2-byte global load, g = other global load, M = (H)GMMA,
w = wait, b = barrier, r = shared load, l = ldmatrix, t = shared store, A = atomic, G = global store.
    python bench/dev/w4_sass.py [--dump DIR]"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.kernels import w4a16 as W  # noqa: E402

KINDS = [(r"LDGSTS", "a"), (r"LDGDEPBAR", ""), (r"LDG\.E\.128", "W"), (r"LDG\.E\.U16", "s"), (r"LDG", "g"),
         (r"H?G?MMA", "M"), (r"DEPBAR|WARPGROUP\.DEPBAR", "w"), (r"BAR", "b"), (r"LDSM", "l"), (r"LDS", "r"),
         (r"STS", "t"), (r"ATOMG|RED", "A"), (r"STG", "G")]


def compile_cfg(BM, BN, R, nw, ns, pre=False, sz=0, perp=4):
    sig = {"x_ptr": "*bf16", "u_ptr": "*i16", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
           "lock_ptr": "*i32", "M": "i32", "N": "i32", "KU": "i32", "PER": "i32", "SPLIT": "i32", "sxm": "i32",
           "sym": "i32", "BM": "constexpr", "BN": "constexpr", "R": "constexpr", "SPLITK": "constexpr",
           "SLICES": "constexpr", "PRESCALE": "constexpr", "USE_ASM": "constexpr", "FP16": "constexpr",
           "F32DOT": "constexpr", "TILED": "constexpr", "sz_ptr": "*i32", "SZ": "constexpr", "PERP": "constexpr"}
    const = {"BM": BM, "BN": BN, "R": R, "SPLITK": True, "SLICES": True, "PRESCALE": pre, "USE_ASM": True,
             "FP16": False, "F32DOT": False, "TILED": True, "SZ": sz, "PERP": perp if sz == 2 else 1}
    div = [0, 1, 2, 3, 4, 5, 6, 9, 12, 13, 24]            # pointers and strides: multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i in div}
    return triton.compile(ASTSource(W._w4a16_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": nw, "num_stages": ns})


def sass(k) -> str:
    import triton.backends.nvidia as nv
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


def summary(text: str) -> str:
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s*(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9.]*)", line)
        if not m:
            continue
        op = m.group(1)
        for pat, ch in KINDS:
            if re.match(pat, op):
                out.append(ch)
                break
    return "".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None, help="also write each config's SASS here")
    a = ap.parse_args()
    # (BM, BN, R, warps, stages, prescale, SZ mode): the M <= 16 default with each scale/zero mode, and gate_up's
    cfgs = [(16, 64, 2, 4, 2, False, 0), (16, 64, 2, 4, 2, False, 1), (16, 64, 2, 4, 2, False, 2),
            (16, 64, 1, 4, 3, False, 0), (16, 64, 1, 4, 3, False, 2)]
    for c in cfgs:
        k = compile_cfg(*c, perp=16)
        text = sass(k)
        if a.dump:
            Path(a.dump).mkdir(parents=True, exist_ok=True)
            (Path(a.dump) / ("cfg_" + "_".join(map(str, c)) + ".sass")).write_text(text)
        print(f"{c}: shared {k.metadata.shared} B\n   {summary(text)}")


if __name__ == "__main__":
    main()
