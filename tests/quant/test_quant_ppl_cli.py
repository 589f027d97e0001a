import math

import pytest
import torch
import torch.nn.functional as F

from specq.models.config import ModelConfig
from specq.models.llama import Transformer, causal_mask
from specq.quant.ppl import perplexity


def test_perplexity_windows_match_manual():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, 50, (11,))
    ppl, n = perplexity(m, ids, ctx=4, progress=False)
    assert n == 3 + 3 + 2                                      # windows [0:4] [4:8] [8:11]
    nll = 0.0
    for s in (0, 4, 8):
        x = ids[s:s + 4]
        m.setup_cache(4)
        p = torch.arange(x.numel())
        with torch.no_grad():
            lg = m(x, p, p, causal_mask(0, x.numel(), 4))[0]
        nll += F.cross_entropy(lg[:-1], x[1:], reduction="sum").item()
    assert math.isclose(ppl, math.exp(nll / 8), rel_tol=1e-6)
    assert perplexity(m, ids, ctx=4, max_tokens=6, progress=False)[1] == 3 + 1


def test_cli_help_and_errors(capsys):
    from specq.quant.cli import main
    for cmd in ("quantize", "ppl"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        for opt in ("--model", "--format", "--method", "--group-size", "--calib", "--fit-group", "--act-order"):
            assert opt in out
    assert "--max-tokens" in out and "--data" in out
    assert main(["ppl", "--model", "/nonexistent/model"]) == 2
    assert "model not found" in capsys.readouterr().err
