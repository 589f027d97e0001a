"""Last-dim argmax kernel (specq.kernels.argmax) under TRITON_INTERPRET=1: bit-equal to torch.argmax (first index of
ties, first NaN, -inf rows), one chunk and several (the last-arriving program's reduction), repeated calls (the
counter is reset), the custom op under torch.compile; and the CPU fallback."""

import pytest
import torch

from specq.kernels import argmax as AM


def test_cpu_falls_back_to_reference():
    x = torch.randn(3, 50)
    x[1, 7] = x[1, 30] = 9.0
    assert not AM.usable(x) or AM.INTERPRET
    assert torch.equal(AM.argmax(x), x.argmax(-1))
    assert torch.equal(AM.argmax(x[0]), x[0].argmax(-1))


@torch.no_grad()
def test_custom_op_under_compile():
    x = torch.randn(2, 40)
    f = torch.compile(lambda a: torch.ops.specq.argmax(a) + 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), x.argmax(-1) + 1)
    torch._dynamo.reset()


CODE = r'''
import torch
from specq.kernels import argmax as AM
g = torch.Generator().manual_seed(0)
bad = []

def rows(R, V):
    """R random rows of V plus the special cases (ties, NaN, -inf, all equal) on some of them."""
    x = torch.randn(R, V, generator=g)
    if V > 1:
        j = torch.randint(0, V, (2,), generator=g).sort().values.tolist()
        x[0, j] = x[0].max() + 1                          # a tie: the first index wins
    if R > 1:
        x[1] = float("-inf")                              # all -inf: index 0
    if R > 2:
        x[2] = 0.5                                        # all equal: index 0
    return x

cases = []
for V in (1, 7, 1000):
    for R in (1, 3):
        cases.append((rows(R, V), f"R{R} V{V}"))
x = rows(3, 1000)
x[0, [800, 3]] = float("nan")                              # NaN is the max: the first NaN
x[1, 999] = float("nan")                                   # a NaN in the last element of a -inf row
x[2, [5, 6]] = float("inf"); x[2, 900] = float("nan")     # NaN over +inf
cases.append((x, "nan"))
y = torch.randn(1, 128256, generator=g)
y[0, 77777] = y[0, 120000] = 9.0
cases.append((y, "llama3 vocab"))
cases.append((torch.full((1, 128256), float("-inf")), "llama3 -inf"))

def check(x, name):
    want = x.argmax(-1)
    for call in (1, 2):                                    # a second call: the counters were reset
        got = AM._run(x)
        if not torch.equal(got, want) or got.dtype != torch.int64:
            bad.append((name, call, got.tolist()[:4], want.tolist()[:4]))

for block, max_nb in ((1024, 256), (16, 256), (16, 8)):   # one chunk a row; several; several blocks a chunk
    AM.BLOCK, AM.MAX_NB = block, max_nb
    for x, name in cases:
        if x.shape[1] > 1000 and block != 1024:
            continue
        assert AM.usable(x), name
        check(x, f"{name} block {block} nb {max_nb}")
AM.BLOCK, AM.MAX_NB = 16, 256
x = torch.randn(2, 3, 100, generator=g)
if not torch.equal(AM.argmax(x), x.argmax(-1)) or not torch.equal(AM.argmax(x[0, 0]), x[0, 0].argmax(-1)):
    bad.append("batch dims")
if AM._counters and int(next(iter(AM._counters.values())).abs().sum()) != 0:
    bad.append("counters not reset")
f = torch.compile(lambda a: AM.argmax(a) + 1, fullgraph=True, backend="aot_eager")
x = torch.randn(3, 500, generator=g)
if not torch.equal(f(x), x.argmax(-1) + 1):
    bad.append("compiled")
print("BAD", bad) if bad else print("ALLOK")
'''


def test_argmax_kernel_interpreted():
    pytest.importorskip("triton")
    from tests.triton_interp import run_interpreted
    out = run_interpreted(CODE)
    assert "ALLOK" in out, out
