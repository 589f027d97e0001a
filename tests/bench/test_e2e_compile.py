"""The e2e work units torch.compile'd (CPU inductor, toy shapes) give the eager units' outputs: the verifier with
one dynamic token count over chains and a tree, the draft-model chain step; and bench/merge_e2e.py."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from specq.bench.e2e_units import ChainDrafter, EagleDrafter, Graphs, Verifier, chain_parents
from specq.bench.randmodel import build_eagle_head, build_random, config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def filled_tiny(seed):
    """A tiny W4A16 model with a 64-slot cache of random K/V, and a CPU Graphs."""
    torch.manual_seed(seed)
    m = build_random(config("tiny"), "w4a16", "cpu", torch.float32)
    m.setup_cache(64)
    for layer in m.layers:
        layer.self_attn.cache.k.normal_()
        layer.self_attn.cache.v.normal_()
    return m, Graphs("cpu")


@torch.inference_mode()
def test_compiled_units_match_eager():
    m, g = filled_tiny(0)
    eager, comp = Verifier(m, 64, g, "e"), Verifier(m, 64, g, "c", compile=True)
    comp.shapes = eager.shapes                        # the same random draft tokens
    for parents in (chain_parents(1), chain_parents(3), chain_parents(6), [-1, 0, 0, 1, 2, 2]):
        (t0, h0), (t1, h1) = eager.run(parents, 20), comp.run(parents, 20)
        assert torch.equal(t0, t1)
        assert torch.allclose(h0, h1, atol=1e-4, rtol=1e-4)
    d0, d1 = ChainDrafter(m, 64, g, "x"), ChainDrafter(m, 64, g, "y", compile=True)
    d1.ids = d0.ids
    assert torch.equal(d0.run(3, 30), d1.run(3, 30))


@pytest.mark.parametrize("blocks", [False, True])
@torch.inference_mode()
def test_compiled_eagle_drafter_matches_eager(monkeypatch, blocks):
    """EagleDrafter(compile=True): whole commit / tree steps compiled, or (blocks) only the head's layer compiled
    in place; eager outputs are taken first (the in-place compile would reach the eager drafter too)."""
    from specq.models import llama
    torch.manual_seed(1)
    m = build_random(config("tiny"), "bf16", "cpu", torch.float32)
    head = build_eagle_head(m, "cpu", torch.float32)
    head.setup_cache(96)
    g = Graphs("cpu")
    e0 = EagleDrafter(head, 96, g, "a", top_k=4)
    cases = ((1, (3, 10)), (3, (3, 10)), (2, (2, 7)))
    ref, snaps = [], []

    def kv():
        return [(l.self_attn.cache.k.clone(), l.self_attn.cache.v.clone()) for l in head.layers]
    for a, (depth, total) in cases:
        snaps.append(kv())                                # the head's cache before each case, for the second pass
        e0.commit(a, 40)
        ref.append((e0.root_logp.clone(), e0.tree(depth, total, 40)))
    monkeypatch.setattr(llama, "COMPILE_BLOCKS", blocks)
    torch._dynamo.reset()
    e1 = EagleDrafter(head, 96, g, "b", top_k=4, compile=True)
    assert (e1.tree_fn == e1._tree) is blocks and (head.layers[0]._compiled_call_impl is not None) is blocks
    e1.ids, e1.feats = e0.ids, e0.feats
    for (a, (depth, total)), (lp0, t0), snap in zip(cases, ref, snaps):
        for l, (k, v) in zip(head.layers, snap):
            l.self_attn.cache.k.copy_(k)
            l.self_attn.cache.v.copy_(v)
        e1.commit(a, 40)
        torch.testing.assert_close(e1.root_logp, lp0, atol=1e-4, rtol=1e-4)
        assert torch.equal(e1.tree(depth, total, 40), t0)
    torch._dynamo.reset()


def _merge_mod():
    spec = importlib.util.spec_from_file_location("merge_e2e", ROOT / "bench" / "merge_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merge_runs(tmp_path):
    base = {"device": "H100", "torch": "2.11", "latency": [], "planner": [], "profile": {}}
    real = {"model": "smollm2", "format": "bf16", "method": "eagle", "structure": "eagle", "acceptance": "real"}
    row = lambda m, f: {"model": m, "format": f, "method": "none", "structure": "none", "acceptance": "none"}  # noqa: E731
    a = dict(base, command="a", date="2026-01-01", rows=[real, row("llama3-8b", "w4a16")],
             errors=["llama3-8b w8a8: InductorError: x"])
    b = dict(base, command="b", date="2026-01-02", rows=[real, row("llama3-8b", "w8a8")], errors=["llama3-70b w8a8: OOM"])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    mod = _merge_mod()
    res = mod.merge([pa, pb])
    assert [r["format"] for r in res["rows"]] == ["bf16", "w4a16", "w8a8"]      # the copied real row once
    assert res["errors"] == ["llama3-70b w8a8: OOM"]                             # the fixed error moved to runs
    assert res["runs"][0]["errors"] == ["llama3-8b w8a8: InductorError: x"]
    assert res["command"] == "a ; b" and res["date"] == "2026-01-02"
    pb.write_text(json.dumps(dict(b, rows=[row("llama3-8b", "w4a16")])))
    with pytest.raises(SystemExit):                                              # one row measured twice
        mod.merge([pa, pb])
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    for bad, msg in (("missing.json", "cannot read"), ("bad.json", "cannot read"), ("other.json", "not a bench/e2e.py")):
        with pytest.raises(SystemExit, match=msg):
            mod.merge([pa, tmp_path / bad])


@pytest.mark.parametrize("flag,value", [("--side-format", "w5a5"), ("--compile-mode", "regional")])
def test_e2e_bad_choice(capsys, flag, value):
    from specq.bench.e2e import main
    from specq.models import llama
    with pytest.raises(SystemExit) as e:
        main(["--out", "/tmp/x", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice" in err and "Traceback" not in err
    assert llama.COMPILE_BLOCKS is False                     # rejected before the switch is touched


@pytest.mark.parametrize("ms,msg", [("2,4", "start at 1"), ("1,x", "comma list of integers"), ("1,256", "<= 128")])
def test_e2e_bad_ms_one_line(ms, msg):
    """bench/e2e.py --ms: bad values give one error line and a non-zero exit, no traceback."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "bench" / "e2e.py"), "--out", "/tmp/x", "--ms", ms],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_e2e_ms_parsed():
    from specq.bench.e2e import parse_args
    assert parse_args(["--out", "/tmp/x", "--ms", "16,1,4,4"]).ms == (1, 4, 16)


@torch.inference_mode()
def test_compile_blocks_units_match_eager(monkeypatch):
    """bench/e2e.py --compile-mode blocks: the verifier and the draft chain over regionally compiled layers give the
    eager units' outputs (eager outputs taken first: compile_blocks compiles the model's layers in place)."""
    from specq.models import llama
    m, g = filled_tiny(2)
    eager, d0 = Verifier(m, 64, g, "e"), ChainDrafter(m, 64, g, "x")
    cases = (chain_parents(1), chain_parents(4), [-1, 0, 0, 1, 2, 2])
    ref = [eager.run(p, 20) for p in cases]
    chain = d0.run(3, 30)
    monkeypatch.setattr(llama, "COMPILE_BLOCKS", True)
    torch._dynamo.reset()
    comp, d1 = Verifier(m, 64, g, "c", compile=True), ChainDrafter(m, 64, g, "y", compile=True)
    assert comp.fwd == comp._fwd and m.layers[0]._compiled_call_impl is not None
    comp.shapes, d1.ids = eager.shapes, d0.ids
    for p, (t0, h0) in zip(cases, ref):
        t1, h1 = comp.run(p, 20)
        assert torch.equal(t0, t1)
        assert torch.allclose(h0, h1, atol=1e-4, rtol=1e-4)
    assert torch.equal(chain, d1.run(3, 30))
    torch._dynamo.reset()
