"""CLI: bad input gets one line on stderr and a non-zero exit, never a traceback."""
import json

import pytest

from specq.cli import main
from tests.models.test_hf import make_ckpt


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,msg", [
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--top-k", "-3"], "top_k"),
    (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "hi", "--model", "/no/such/model"], "model not found"),
    (["generate", "hi", "--device", "tpu"], "invalid device"),
    (["bench", "spec", "--tree", "16:5"], "invalid --tree"),
    (["bench", "spec", "--tree", "0:5:80"], "invalid --tree"),
    (["train-eagle", "--self-instruct", "1.5", "--out", "/nonexistent/never/made"], "invalid --self-instruct"),
    (["generate", "hi", "--format", "w8a8", "--quant-lm-head"], "weight-only"),
    (["generate", "hi", "--quant-lm-head"], "--quant-lm-head needs --format"),
    (["bench", "spec", "--format", "w4a8", "--quant-lm-head"], "weight-only"),
    # a bad --compensate spec fails before the model is loaded (here: before "model not found")
    (["generate", "hi", "--format", "w3a16", "--compensate", "budget=5%,scope=step", "--model", "/no/such/model"],
     "bad --compensate"),
])
def test_bad_arguments(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_generate_tiny_model_and_prompt_too_long(capsys, tmp_path):
    _, d = make_ckpt(tmp_path, "llama")
    rc, out, err = run(capsys, "generate", "w1 w2 w3", "--model", str(d), "--no-chat", "--max-new-tokens", "5", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["tokens"] >= 1 and res["finish_reason"] in ("stop", "length")
    long_prompt = " ".join(["w5"] * 300)  # the tiny config's context is 256
    rc, out, err = run(capsys, "generate", long_prompt, "--model", str(d), "--no-chat")
    assert rc == 2 and "context" in err and err.count("\n") == 1


def test_bench_latency_tiny_model(capsys, tmp_path):
    """`specq bench latency`: T(M) per format through the engine's runner, JSON + plot, ratios against M=1."""
    _, d = make_ckpt(tmp_path, "llama")
    out = tmp_path / "lat.json"
    rc, _, err = run(capsys, "bench", "latency", "--model", str(d), "--formats", "none", "--ms", "2,4",
                     "--reps", "1", "--out", str(out))
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert [r["M"] for r in res["rows"]] == [1, 2, 4] and res["compile"] is False
    assert res["rows"][0]["ratio_vs_M1"] == 1.0 and all(r["ms"] > 0 for r in res["rows"])
    assert out.with_suffix(".png").exists()
    rc, _, err = run(capsys, "bench", "latency", "--model", str(d), "--ms", "0")
    assert rc == 2 and "--ms" in err


@pytest.mark.parametrize("argv,compiled,blocks", [
    (["generate", "hi"], False, False),
    (["generate", "hi", "--compile"], True, False),
    (["generate", "hi", "--compile-blocks"], True, True),
    (["serve", "--compile-blocks"], True, True),
    (["bench", "spec", "--compile-blocks"], True, True),
])
def test_compile_flags(monkeypatch, argv, compiled, blocks):
    """--compile-blocks implies --compile and switches the process to regional compilation."""
    from specq.cli import build_parser, compile_flag
    from specq.models import llama
    monkeypatch.setattr(llama, "COMPILE_BLOCKS", False)
    assert compile_flag(build_parser().parse_args(argv)) is compiled
    assert llama.COMPILE_BLOCKS is blocks
