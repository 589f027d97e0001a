"""The GPU default draft swaps WQLinear for dense Linears holding the dequantized weights: same logits."""
import torch

from specq.models import load_model
from specq.quant import WQLinear, quantize_model
from specq.spec.factory import _dense
from tests.models.test_hf import make_ckpt


def test_dense_swap_keeps_logits(tmp_path):
    m, _ = load_model(str(make_ckpt(tmp_path, "llama")[1]), dtype=torch.float32)
    quantize_model(m, fmt="w4a16", method="rtn", group_size=32, fit_group=True, progress=False)
    x = torch.tensor([5, 9, 2, 7, 1])
    pos = torch.arange(5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    m.setup_cache(5)
    a = m(x, pos, pos, mask, return_hidden=False)
    assert any(isinstance(z, WQLinear) for z in m.modules())
    _dense(m)
    assert not any(isinstance(z, WQLinear) for z in m.modules())
    m.setup_cache(5)
    b = m(x, pos, pos, mask, return_hidden=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bundled_head_for_smollm2_alias_and_files():
    from specq.spec.factory import BUNDLED_EAGLE, bundled_head
    want = BUNDLED_EAGLE["smollm2"]
    assert bundled_head("smollm2") == want
    assert bundled_head("/root/models/SmolLM2-135M-Instruct.Q4_1.gguf") == want     # the alias's own file by path
    assert bundled_head("/x/smollm2-135m-instruct-f16.gguf") == want
    assert bundled_head("/x/SmolLM2-360M-Instruct.gguf") is None                     # another model: no head
    assert bundled_head("/tmp/tiny-llama") is None
    assert (want / "config.json").is_file() and (want / "model.safetensors").is_file()
