"""Quantized matmuls trace as one opaque op under torch.compile(fullgraph=True) and give the eager output."""
import torch

from specq.models import load_model
from specq.quant import W8A8Linear, WQLinear, opaque, quantize_model
from tests.models.test_hf import make_ckpt


@torch.no_grad()
def test_compiled_quantized_model_matches_eager(tmp_path, monkeypatch):
    model, _ = load_model(str(make_ckpt(tmp_path, "llama")[1]), dtype=torch.float32)
    quantize_model(model, fmt="w4a16", method="rtn", group_size=32, fit_group=True, progress=False)
    lin = model.layers[0].mlp.down_proj
    assert isinstance(lin, WQLinear)
    w8 = W8A8Linear(lin.in_features, lin.out_features)            # one W8A8 Linear beside the W4A16 ones
    w8.wq.copy_(torch.randint(-127, 128, w8.wq.shape, dtype=torch.int8))
    w8.sw.uniform_(0.001, 0.01)
    model.layers[0].mlp.down_proj = w8
    model.setup_cache(6)
    x, pos = torch.tensor([3, 1, 4, 1, 5, 9]), torch.arange(6)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    eager = model(x, pos, pos, mask, return_hidden=False)
    monkeypatch.setattr(opaque, "FORCE", True)
    opaque._MODULES.clear()
    n = opaque.register_all(model)
    assert n == sum(isinstance(m, (WQLinear, W8A8Linear)) for m in model.modules()) >= 2
    graphs = []

    def backend(gm, example_inputs):   # keep dynamo's graph, run it as is
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(lambda: model(x, pos, pos, mask, return_hidden=False), fullgraph=True, backend=backend)()
    torch._dynamo.reset()
    ops = [nd for nd in graphs[0].graph.nodes if "specq.qmatmul" in str(nd.target)]
    assert len(graphs) == 1 and len(ops) == n           # one opaque call per quantized Linear, no graph break
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_unregistered_module_under_compile_is_one_clear_error(monkeypatch):
    """A quantized Linear that reaches torch.compile without a handle (never registered, never run eagerly) stops
    tracing with the SpecqError that says what to call, not an AttributeError."""
    import pytest
    monkeypatch.setattr(opaque, "FORCE", True)
    lin = W8A8Linear(64, 32)
    lin.sw.uniform_(0.001, 0.01)
    assert "_opaque_handle" not in lin.__dict__
    torch._dynamo.reset()
    with pytest.raises(Exception) as ei:
        torch.compile(lambda x: lin(x), fullgraph=True, backend="eager")(torch.randn(2, 64))
    torch._dynamo.reset()
    assert "register_all" in str(ei.value)              # SpecqError's text (dynamo may wrap the exception)
