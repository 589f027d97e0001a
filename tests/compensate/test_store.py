"""`specq quantize --compensate`: residuals saved with the checkpoint, restored on load; --compensate on ppl."""
import json

import pytest
import torch

from specq.compensate import CompensatedLinear, compensated_modules, keep_fp_weights
from specq.compensate import store
from specq.compensate import tune as T
from specq.errors import SpecqError
from specq.quant.checkpoint import load_quantized
from specq.quant.cli import main
from tests.compensate.test_compensate import logits_of as logits

pytest.importorskip("transformers")
QARGS = ["--format", "w3a16", "--group-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.models.test_hf import make_ckpt
    d = tmp_path_factory.mktemp("store")
    _, src = make_ckpt(d, "llama")
    (d / "text.txt").write_text(" ".join(f"w{(7 * i) % 90}" for i in range(300)))
    return d, src


def in_process(src, spec, method="rtn", act_order=False):
    """The model `specq generate --format w3a16 --compensate spec` builds (CPU, fp32), k not yet set."""
    from specq.models import load_model
    from specq.quant import quantize_model
    m, tok = load_model(str(src), dtype=torch.float32, device="cpu")
    with keep_fp_weights() as fp:
        quantize_model(m, "w3a16", method, group_size=32, tokenizer=tok, act_order=act_order, progress=False)
    T.attach(m, spec, fp, tokenizer=tok)
    return m


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_compensate_round_trip(ckpt, tmp_path, capsys, method):
    d, src = ckpt
    extra = ["--method", "gptq", "--act-order"] if method == "gptq" else []
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), *QARGS, *extra, "--compensate", "k=0.1", "--out", str(out)]) == 0
    assert "residual.safetensors" in capsys.readouterr().out
    conf = json.loads((out / "config.json").read_text())["quantization"]
    assert conf["compensate"] == {"spec": "k=0.1", "selector": "approx"}
    m, _ = load_quantized(out)
    mods = compensated_modules(m)
    assert len(mods) == 8 and all(cl.k_chunk == 0 for _, cl in mods)   # k comes with apply_compensation
    ref = in_process(src, "k=0.1", method, act_order=method == "gptq")
    for (n1, a), (n2, b) in zip(mods, compensated_modules(ref)):
        assert n1 == n2
        assert torch.equal(a.residual.codes, b.residual.codes) and torch.equal(a.residual.scales, b.residual.scales)
        assert torch.equal(a.stats, b.stats)
    ids = torch.randint(0, 90, (20,))
    plain = logits(m, ids)
    chosen = T.apply_compensation(m, None, log=None)                   # the saved spec
    T.apply_compensation(ref, "k=0.1", log=None)
    assert chosen["qkv_proj"] == pytest.approx(6 / 64) and m.layers[0].mlp.down_proj.k_chunk == 10
    got = logits(m, ids)
    assert torch.equal(got, logits(ref, ids)) and not torch.allclose(got, plain)
    T.apply_compensation(m, "off", log=None)
    assert torch.equal(logits(m, ids), plain)


def test_llm_loads_saved_compensation_and_tunes_a_saved_budget(ckpt, tmp_path, monkeypatch):
    from specq.api import LLM
    d, src = ckpt
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), *QARGS, "--compensate", "k=0.1", "--out", str(out)]) == 0
    kw = dict(max_new_tokens=8, temperature=0.0)
    a = LLM(str(out), device="cpu").generate("w1 w2 w3", **kw).ids
    b = LLM(str(src), device="cpu", quant=dict(fmt="w3a16", method="rtn", group_size=32),
            compensate="k=0.1").generate("w1 w2 w3", **kw).ids
    c = LLM(str(out), device="cpu", compensate="off").generate("w1 w2 w3", **kw).ids
    assert a == b and len(a) >= 1
    assert c == LLM(str(src), device="cpu", quant=dict(fmt="w3a16", method="rtn", group_size=32)).generate(
        "w1 w2 w3", **kw).ids
    out2 = tmp_path / "qb"
    assert main(["quantize", "--model", str(src), *QARGS, "--compensate", "budget=5%", "--out", str(out2)]) == 0
    seen = []

    def fake(model, budget, scope="layer"):
        seen.append((budget, scope))
        for _, cl in compensated_modules(model):
            cl.set_k(2)
        return {"qkv_proj": 2 / 64}
    monkeypatch.setattr(T, "tune_budget", fake)
    llm = LLM(str(out2), device="cpu")
    assert seen == [(0.05, "layer")] and llm.model.layers[1].self_attn.o_proj.k_chunk == 2


def test_ppl_compensate_cli(ckpt, tmp_path, capsys):
    d, src = ckpt
    data = ["--data", str(d / "text.txt"), "--ctx", "32", "--json"]

    def ppl(argv):
        assert main(["ppl", *argv, *data]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fresh = ppl(["--model", str(src), *QARGS, "--compensate", "k=0.1"])
    plain = ppl(["--model", str(src), *QARGS])
    assert fresh["compensate"] == "k=0.1" and fresh["k_fraction"]["down_proj"] == pytest.approx(10 / 96, abs=1e-5)
    assert "compensate" not in plain and fresh["ppl"] != plain["ppl"]
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), *QARGS, "--compensate", "k=0.1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert ppl(["--model", str(out)])["ppl"] == fresh["ppl"]
    assert ppl(["--model", str(out), "--compensate", "off"])["ppl"] == plain["ppl"]


def test_compensate_errors(ckpt, tmp_path, capsys):
    d, src = ckpt

    def fails(argv, words):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    fails(["quantize", "--model", str(src), "--format", "w8a8", "--compensate", "k=0.1", "--out", str(tmp_path / "x")],
          "weight-only")
    fails(["quantize", "--model", str(src), *QARGS, "--compensate", "k=7", "--out", str(tmp_path / "x")],
          "bad --compensate")
    assert not (tmp_path / "x").exists()                               # both before anything was written
    fails(["ppl", "--model", str(src), "--compensate", "k=0.1"], "full-precision weights")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), *QARGS, "--compensate", "k=0.1,selector=exact",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    with pytest.raises(SpecqError, match="selector=exact"):
        T.apply_compensation(load_quantized(out)[0], "k=0.1", log=None)
    res = out / store.FILE
    good = res.read_bytes()
    res.write_bytes(good[:500])
    fails(["ppl", "--model", str(out)], "corrupt or missing compensation residuals")
    res.unlink()
    fails(["ppl", "--model", str(out)], "corrupt or missing compensation residuals")
    from safetensors.torch import load_file, save_file
    res.write_bytes(good)
    sd = load_file(str(res))
    for key, bad in (("layers.0.mlp.down_proj.scales", torch.ones(3)),
                     ("layers.1.self_attn.o_proj.codes", torch.zeros(64, 8, dtype=torch.int64)),
                     ("layers.0.self_attn.qkv_proj.scales", torch.full((128,), float("nan"))),
                     ("layers.1.mlp.down_proj.stats", torch.ones(4, 2, 8))):
        save_file({**sd, key: bad}, str(res))
        with pytest.raises(SpecqError, match=key.replace(".", r"\.")):
            load_quantized(out)
    save_file({**sd, "layers.9.mlp.down_proj.codes": sd["layers.0.mlp.down_proj.codes"].clone()}, str(res))
    with pytest.raises(SpecqError, match="unexpected"):
        load_quantized(out)
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.gate_up_proj" not in k}, str(res))
    with pytest.raises(SpecqError, match="missing"):
        load_quantized(out)
    conf = json.loads((out / "config.json").read_text())
    conf["quantization"]["compensate"] = {"spec": "k=0.1", "selector": "fancy"}
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(SpecqError, match="compensate section"):
        load_quantized(out)


def test_save_quantized_keeps_a_wrapped_linears_perm(ckpt, tmp_path):
    """An act-order import's column order (WQLinear.perm) is saved and restored through the CompensatedLinear."""
    from specq.models import load_model
    from specq.quant import quantize_model
    from specq.quant.checkpoint import save_quantized
    from specq.quant.wq import WQLinear
    d, src = ckpt
    m, tok = load_model(str(src), dtype=torch.float32, device="cpu")
    with keep_fp_weights() as fp:
        quantize_model(m, "w3a16", "rtn", group_size=32, tokenizer=tok, progress=False)
    old = m.layers[0].mlp.down_proj
    p = torch.randperm(old.in_features)
    new = WQLinear.from_codes(old.codes(), old.scales, old.zeros, old.bits, old.group_size, old.sym, perm=p)
    m.layers[0].mlp.down_proj = new
    fp[new] = fp.pop(old)
    T.attach(m, "k=0.1", fp, tokenizer=tok)
    save_quantized(m, tmp_path / "q", tok)
    conf = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert conf["perm_modules"] == ["layers.0.mlp.down_proj"]
    m2, _ = load_quantized(tmp_path / "q")
    assert torch.equal(m2.layers[0].mlp.down_proj.base.perm, p)
    assert torch.equal(m2.layers[0].mlp.down_proj.residual.codes, m.layers[0].mlp.down_proj.residual.codes)


def test_save_quantized_rewrites_a_stale_residual_file(ckpt, tmp_path):
    d, src = ckpt
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), *QARGS, "--compensate", "k=0.1", "--out", str(out)]) == 0
    assert (out / store.FILE).exists()
    assert main(["quantize", "--model", str(src), *QARGS, "--out", str(out)]) == 0
    assert not (out / store.FILE).exists()
    m, _ = load_quantized(out)
    assert not compensated_modules(m) and not isinstance(m.layers[0].mlp.down_proj, CompensatedLinear)
