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


def test_cli_quant_lm_head(capsys, tmp_path):
    """--quant-lm-head: w8a8 is refused in one line (before loading); w4a16 writes a checkpoint whose head loads
    quantized."""
    from specq.quant import WQLinear
    from specq.quant.checkpoint import load_quantized
    from specq.quant.cli import main
    from tests.models.test_hf import make_ckpt
    for argv in (["quantize", "--format", "w8a8", "--quant-lm-head", "--out", str(tmp_path / "x")],
                 ["ppl", "--format", "w4a8", "--quant-lm-head"], ["ppl", "--quant-lm-head"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "head" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    _, d = make_ckpt(tmp_path, "llama")
    for flag, want in (([], torch.nn.Linear), (["--quant-lm-head"], WQLinear)):
        out = tmp_path / f"q{len(flag)}"
        assert main(["quantize", "--model", str(d), "--format", "w4a16", "--group-size", "32", "--no-progress",
                     "--out", str(out)] + flag) == 0
        assert ("lm_head RTN" in capsys.readouterr().out) == bool(flag)
        m, _ = load_quantized(out)
        assert isinstance(m.lm_head, want) and m.quant_info["lm_head"] == bool(flag)
