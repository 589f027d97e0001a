"""specq.models.fused: the decoder's norms and residual adds go to a module's fused2d where it
offers one (the few-token CUDA kernel), and to the separate torch ops otherwise; both give the model's output.
On the CPU a stand-in fused2d (plain torch, written independently of fused.reference) plays the kernel, in eager
mode and through the opaque op under torch.compile."""
import pytest
import torch

from specq.bench.randmodel import build_random, config
from specq.kernels import w4mma
from specq.models import fused
from specq.models.llama import RMSNorm
from specq.quant import opaque
from specq.quant.wq import WQLinear

CALLS = []


def stand_in_fused2d(self, x2, norm_w, eps, res):
    CALLS.append((self.out_features, norm_w is not None, res is not None))
    xf = x2.float()
    if norm_w is not None:
        xf = norm_w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x2.dtype).float()
    y = xf.to(x2.dtype) @ self.dequantize().to(x2.dtype).t()
    return y if res is None else res + y


def stand_in_can_fuse(self, x2, norm, residual):
    return x2.shape[0] <= 4


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(WQLinear, "fused2d", stand_in_fused2d)
    monkeypatch.setattr(WQLinear, "can_fuse", stand_in_can_fuse)
    CALLS.clear()
    yield
    CALLS.clear()


def test_reference_is_the_unfused_math():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6, bias=False)
    norm = RMSNorm(8, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(3, 8), torch.randn(3, 6)
    torch.testing.assert_close(fused.linear(lin, x, norm=norm, residual=r), r + lin(norm(x)), rtol=0, atol=0)
    torch.testing.assert_close(fused.linear(lin, x, norm=norm), lin(norm(x)), rtol=0, atol=0)


def test_wqlinear_does_not_fuse_on_cpu():
    m = WQLinear(128, 32, 4, 128)
    assert not m.can_fuse(torch.randn(1, 128), None, torch.randn(1, 32))


@torch.no_grad()
def test_block_routes_every_neighbour_into_the_matmuls(stand_in):
    model = build_random(config("tiny", num_layers=2), "w4a16", "cpu", torch.float32)
    model.setup_cache(16)
    x, pos = torch.tensor([3, 1]), torch.arange(2)
    mask = torch.ones(2, 16, dtype=torch.bool).tril()
    out = model(x, pos, pos, mask, return_hidden=False)
    D, I = model.cfg.hidden_size, model.cfg.intermediate_size
    nq = (model.cfg.num_heads + 2 * model.cfg.num_kv_heads) * model.cfg.head_dim
    # per layer: qkv with the input norm, o with the residual, gate_up with the post-attention norm, down with
    # the residual
    assert CALLS == [(nq, True, False), (D, False, True), (2 * I, True, False), (D, False, True)] * 2
    CALLS.clear()
    with pytest.MonkeyPatch.context() as mp:                  # no fusion at all: the plain ops
        mp.setattr(WQLinear, "can_fuse", lambda *a: False)
        plain = model(x, pos, pos, mask, return_hidden=False)
    assert CALLS == []
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    # many tokens: can_fuse says no, the same model runs unfused
    x6, pos6 = torch.arange(6), torch.arange(6)
    model(x6, pos6, pos6, torch.ones(6, 16, dtype=torch.bool).tril(), return_hidden=False)
    assert CALLS == []


@torch.no_grad()
def test_compiled_block_calls_the_fused_op(stand_in, monkeypatch):
    monkeypatch.setattr(opaque, "FORCE", True)
    model = build_random(config("tiny", num_layers=2), "w4a16", "cpu", torch.float32)
    model.setup_cache(16)
    x, pos = torch.tensor([3]), torch.arange(1)
    mask = torch.ones(1, 16, dtype=torch.bool).tril()
    eager = model(x, pos, pos, mask, return_hidden=False)
    CALLS.clear()
    opaque.register_all(model)
    torch._dynamo.reset()
    model.compile_blocks(dynamic=False)
    out = model(x, pos, pos, mask, return_hidden=False)
    assert len(CALLS) == 8                                    # the op ran the module's fused2d at run time
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_fusable_limits():
    assert w4mma.fusable(1, 14336) and not w4mma.fusable(1, 16384 + 128)            # shared memory
    assert w4mma.fusable(1, 4096) and not w4mma.fusable(2, 576) and not w4mma.fusable(0, 576)   # decoding only


def test_fused_kernel_argument_errors():
    from specq.errors import SpecqError
    q = torch.randint(-2**31, 2**31, (32, 128 // 8), dtype=torch.int32)
    mw = w4mma.prepare_mma(q, torch.ones(32, 1), torch.full((32, 1), 8.0), 128)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with pytest.raises(SpecqError, match="K=128"):
        w4mma.w4mma_linear(torch.randn(1, 256, dtype=torch.bfloat16), mw)
    with pytest.raises(SpecqError, match="residual"):
        w4mma.w4mma_linear(x, mw, res=torch.randn(2, 32, dtype=torch.bfloat16))
    with pytest.raises(SpecqError, match="fused prologue"):
        w4mma.w4mma_linear(torch.randn(60, 128 * 14, dtype=torch.bfloat16).view(60, -1)[:, :128 * 14],
                           w4mma.prepare_mma(torch.zeros(32, 14 * 16, dtype=torch.int32), torch.ones(32, 14),
                                             torch.full((32, 14), 8.0), 128), norm_w=torch.ones(128 * 14))


def test_fuse_decision_is_remade_after_a_move(monkeypatch):
    """prepare_fuse caches its answer per device: a module asked on the CPU (no) is asked again once on CUDA."""
    import specq.kernels as KS
    m = WQLinear(128, 32, 4, 128)
    assert m.prepare_fuse() is False and m.__dict__["_fuse_ok"] == (torch.device("cpu"), False)
    calls = []
    monkeypatch.setattr(KS, "wq_fuse_ok", lambda mod: calls.append(mod) or True)
    m.__dict__["_fuse_ok"] = (torch.device("cuda", 0), True)       # as if decided on a GPU earlier
    assert m.prepare_fuse() is False and calls == []                 # back on the CPU: decided again, no kernel
    assert m.__dict__["_fuse_ok"] == (torch.device("cpu"), False)
