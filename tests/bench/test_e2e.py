"""Controlled-acceptance e2e benchmark at toy shapes on CPU: JSON schema, tau vs the profile's expectation,
and the acceptance model itself (draws, hierarchical chain-length distribution)."""
import json
import math

import pytest

from specq.bench.controlled import (Acceptance, accepted_dist, expected_accepted, hier_expected_tokens, hier_stats,
                                    load_profile, mean_sd, step_tokens_dist, struct_depth)
from specq.bench.e2e import main
from specq.errors import SpecqError

pytestmark = pytest.mark.usefixtures("one_thread")

CHAIN = [0.8, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.4]


def write_profile(path):
    trees = {
        "tree-10": dict(cond=[0.6, 0.5, 0.5, 0.4, 0.3, 0.3, 0.2], nodes=10, max_depth=7, depth=6,
                        parents=[-1, 0, 0, 1, 1, 3, 3, 5, 7, 8]),
        "tree-30-d3": dict(cond=[0.7, 0.6, 0.5, 0.4], nodes=30, max_depth=4, depth=3,
                           parents=[-1] + [0] * 10 + [1] * 10 + [11] * 6 + [21] * 3),
    }
    st = {"chain": {"cond": CHAIN, "nodes": 9, "max_depth": 8, "example_parents": list(range(-1, 8)),
                    "spec": {"method": "draft", "k": 8}}}
    for n, t in trees.items():
        st[n] = {"cond": t["cond"], "nodes": t["nodes"], "max_depth": t["max_depth"], "example_parents": t["parents"],
                 "spec": {"method": "eagle", "total_tokens": t["nodes"], "depth": t["depth"], "top_k": 10}}
    path.write_text(json.dumps({"name": "toy", "structures": st}))
    return path


def test_draws_follow_the_profile():
    acc, n = Acceptance(0), 20000
    mean = sum(acc.draw(CHAIN, 4) for _ in range(n)) / n
    m, sd = mean_sd({a: p for a, p in enumerate(accepted_dist(CHAIN, 4))})
    assert m == pytest.approx(expected_accepted(CHAIN, 4))
    assert abs(mean - m) < 4 * sd / math.sqrt(n)
    assert max(acc.draw(CHAIN, 3) for _ in range(200)) == 3          # never deeper than the structure
    assert sum(acc.draw([0.0, 1.0], 2) for _ in range(50)) == 0


def test_hier_distribution_matches_simulation(tmp_path):
    prof = load_profile(write_profile(tmp_path / "p.json"))
    ends, rounds = hier_stats([0.7, 0.6, 0.5, 0.4], 4, 6)
    assert sum(ends.values()) == pytest.approx(1.0) and min(ends) >= 6 and max(ends) <= 6 + 4
    acc, tot, n = Acceptance(1), 0, 20000
    t30 = prof["structures"]["tree-30-d3"]
    for _ in range(n):
        k = 0
        while k < 6:
            k += acc.draw(t30["cond"], struct_depth(prof, "tree-30-d3")) + 1
        tot += acc.draw(CHAIN, k) + 1
    m, sd = mean_sd(step_tokens_dist(prof, "hier-6"))
    assert m == pytest.approx(hier_expected_tokens(prof, "tree-30-d3", 6))
    assert abs(tot / n - m) < 4 * sd / math.sqrt(n)
    assert rounds > 1


def test_bad_profile(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"structures": {"chain": {"cond": [1.5], "nodes": 2, "max_depth": 1}}}))
    with pytest.raises(SpecqError):
        load_profile(p)
    with pytest.raises(SpecqError):
        load_profile(tmp_path / "missing.json")


def test_e2e_tiny_end_to_end(tmp_path, capsys):
    prof_path = write_profile(tmp_path / "p.json")
    out = tmp_path / "out"
    rc = main(["--out", str(out), "--tiny", "--device", "cpu", "--dtype", "float32", "--profile", str(prof_path),
               "--phases", "llama3-8b:w4a16:spec,llama3-70b:w8a8:plain", "--methods", "chain-3,tree-10,hier-4",
               "--tokens", "240", "--plain-tokens", "4", "--reps", "1", "--no-plot"])
    assert rc == 0
    res = json.loads((out / "e2e.json").read_text())
    for k in ("rows", "command", "device", "date", "planner", "latency", "profile"):
        assert k in res
    assert res["device"] == "cpu" and not res["errors"]
    assert res["quant_head"] is False and all(r["lm_head"] == "bf16" for r in res["rows"])   # default: bf16 head
    rows = [r for r in res["rows"] if r["model"] != "smollm2"]
    for r in res["rows"]:
        assert {"model", "format", "method", "acceptance", "tok_s", "tau", "roofline_tok_s"} <= set(r)
        assert r["model"] in ("llama3-8b", "llama3-70b", "smollm2") and r["tok_s"] > 0
    spec = [r for r in rows if r["method"] != "none"]
    assert {r["structure"] for r in spec} >= {"chain-3", "tree-10", "hier-4"}
    assert all(r["acceptance"] == "controlled:toy" for r in spec)
    assert {(r["model"], r["format"]) for r in rows if r["method"] == "none"} == {("llama3-8b", "w4a16"), ("llama3-70b", "w8a8")}
    prof = load_profile(prof_path)
    for r in spec:                                   # tau of the controlled drafter = the profile's expectation
        m, sd = mean_sd(step_tokens_dist(prof, r["structure"]))
        assert r["expected_tau"] == pytest.approx(m)
        assert abs(r["tau"] - m) < 4.5 * sd / math.sqrt(r["steps"]), r
    p = res["planner"][0]
    assert p["choice"] in {n for n, _ in p["top5"]} and p["best_tok_s"] >= p["choice_tok_s"] > 0
    assert "| llama3-8b | w4a16 | chain-3 |" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["whole", "blocks"])
def test_e2e_tiny_compiled(tmp_path, mode):
    """--compile (--compile-mode whole / blocks): every work unit compiled (CPU inductor); rows say so, nothing
    fails, and the regional switch is the process's again afterwards."""
    from specq.models import llama
    prof_path = write_profile(tmp_path / "p.json")
    out = tmp_path / "out"
    rc = main(["--out", str(out), "--tiny", "--device", "cpu", "--dtype", "float32", "--profile", str(prof_path),
               "--phases", "llama3-8b:w4a16:spec", "--methods", "chain-2,tree-10,hier-4", "--tokens", "24",
               "--plain-tokens", "2", "--reps", "1", "--no-plot", "--compile", "--compile-mode", mode])
    assert rc == 0 and llama.COMPILE_BLOCKS is False
    res = json.loads((out / "e2e.json").read_text())
    assert not res["errors"]
    rows = [r for r in res["rows"] if r["model"] == "llama3-8b"]
    assert {r["structure"] for r in rows} >= {"none", "chain-2", "tree-10", "hier-4"}
    assert all(r["step"] == {"whole": "compiled", "blocks": "compiled-blocks"}[mode] and r["tok_s"] > 0 for r in rows)
    assert 1 <= res["planner"][0]["speedup_bound"] and res["planner"][0]["speedup_bound_structure"]


def test_random_model_quantized_head():
    """build_random(quant_head=True): a W4A16 lm_head of its own (untied, codes not shared); the roofline's bytes
    drop by exactly the bf16 head minus the W4A16 one."""
    import torch
    from specq.bench.randmodel import build_random, config, linear_bytes, weight_bytes_per_token
    from specq.quant import WQLinear
    cfg = config("tiny", tie_word_embeddings=True)
    V, D = cfg.vocab_size, cfg.hidden_size
    m = build_random(cfg, "w4a16", "cpu", torch.float32, share_codes=True, quant_head=True)
    assert isinstance(m.lm_head, WQLinear) and (m.lm_head.in_features, m.lm_head.out_features) == (D, V)
    assert isinstance(m.embed_tokens.weight, torch.nn.Parameter) and m.embed_tokens.weight.shape == (V, D)
    codes = [mod.qweight.data_ptr() for mod in m.modules() if isinstance(mod, WQLinear) and mod is not m.lm_head]
    assert m.lm_head.qweight.data_ptr() not in codes
    assert isinstance(build_random(cfg, "w4a16", "cpu", torch.float32).lm_head, torch.nn.Linear)
    m.setup_cache(8)
    with torch.no_grad():
        logits, h = m(torch.arange(4), torch.arange(4), torch.arange(4), torch.ones(4, 8, dtype=torch.bool))
    torch.testing.assert_close(logits, h @ m.lm_head.dequantize().t(), rtol=1e-4, atol=1e-4)
    for fmt in ("w4a16", "w8a8"):
        assert weight_bytes_per_token(cfg, fmt) == weight_bytes_per_token(cfg, fmt, quant_head=False)
    diff = weight_bytes_per_token(cfg, "w4a16") - weight_bytes_per_token(cfg, "w4a16", quant_head=True)
    assert diff == 2 * V * D - linear_bytes("w4a16", D, V) > 0
    for fmt in ("bf16", "w8a8", "w4a8"):
        with pytest.raises(SpecqError, match="w4a16"):
            build_random(cfg, fmt, "cpu", torch.float32, quant_head=True)


def test_e2e_tiny_quant_head(tmp_path):
    """--quant-head: w4a16 phases get a W4A16 target lm_head (row key lm_head, matching roofline), others keep bf16."""
    from specq.bench.e2e import H100_BW
    from specq.bench.randmodel import config, weight_bytes_per_token
    prof_path = write_profile(tmp_path / "p.json")
    out = tmp_path / "out"
    rc = main(["--out", str(out), "--tiny", "--device", "cpu", "--dtype", "float32", "--profile", str(prof_path),
               "--phases", "llama3-8b:w4a16:spec,llama3-70b:w8a8:plain", "--methods", "chain-2,tree-10",
               "--tokens", "24", "--plain-tokens", "2", "--reps", "1", "--no-plot", "--quant-head"])
    assert rc == 0
    res = json.loads((out / "e2e.json").read_text())
    assert not res["errors"] and res["quant_head"] is True and "--quant-head" in res["command"]
    assert all("lm_head" in r for r in res["rows"])
    w4 = [r for r in res["rows"] if r["model"] == "llama3-8b"]
    assert {r["structure"] for r in w4} >= {"none", "chain-2", "tree-10"}   # + the planner's choice
    assert all(r["lm_head"] == "w4a16" for r in w4)
    assert all(r["roofline_tok_s"] == pytest.approx(H100_BW / weight_bytes_per_token(config("tiny"), "w4a16", True))
               for r in w4)
    assert all(r["lm_head"] == "bf16" for r in res["rows"] if r["model"] != "llama3-8b")


def test_e2e_tiny_side_quant_head(tmp_path):
    """--side-quant-head: the draft / intermediate model's lm_head in W4A16 (recorded under side), every method still
    runs (chain drafts, EAGLE tree on the target, hier through the side model's EAGLE head); it needs a w4a16 side."""
    from specq.bench import e2e as E
    prof_path = write_profile(tmp_path / "p.json")
    built = []
    orig = E.Side.__init__

    def spy(self, *args, **kw):
        orig(self, *args, **kw)
        built.append(type(self.model.lm_head).__name__)
    E.Side.__init__ = spy
    try:
        out = tmp_path / "out"
        rc = main(["--out", str(out), "--tiny", "--device", "cpu", "--dtype", "float32", "--profile", str(prof_path),
                   "--phases", "llama3-8b:w4a16:spec", "--methods", "chain-2,tree-10,hier-4", "--tokens", "24",
                   "--plain-tokens", "2", "--reps", "1", "--no-plot", "--side-format", "w4a16", "--side-quant-head"])
    finally:
        E.Side.__init__ = orig
    assert rc == 0 and built == ["WQLinear"]
    res = json.loads((out / "e2e.json").read_text())
    assert not res["errors"] and res["side"] == {"shape": "llama3.2-1b", "format": "w4a16", "lm_head": "w4a16"}
    assert {r["structure"] for r in res["rows"] if r["model"] == "llama3-8b"} >= {"none", "chain-2", "tree-10", "hier-4"}
    with pytest.raises(SpecqError, match="side-format w4a16"):
        main(["--out", str(tmp_path / "o2"), "--tiny", "--device", "cpu", "--side-quant-head"])
