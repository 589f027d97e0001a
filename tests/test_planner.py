"""The draft planner picks the chain length with the best expected tokens/s; bad inputs are refused."""
import pytest

from specq.bench.latency import expected_tokens, plan
from specq.errors import SpecqError


def test_expected_tokens():
    assert expected_tokens([1.0], 4) == 5.0
    assert expected_tokens([0.0], 4) == 1.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)


def brute(T, acc, td, k):  # tokens per second of a k chain by direct enumeration of the stopping depth
    e, p = 0.0, 1.0
    for d in range(k + 1):
        stop = 1 - (acc[d] if d < k else 0.0)
        e += p * stop * (d + 1)
        p *= acc[d] if d < k else 0.0
    return e / (T(k + 1) + k * td)


def test_plan_matches_brute_force_and_reacts_to_cost():
    acc = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    flat = {m: 0.010 for m in (1, 2, 4, 8, 16)}                  # bf16-like: flat verification cost
    best = plan(flat, acc, 0.0005, max_k=8)
    ref = max(range(1, 9), key=lambda k: brute(lambda m: 0.010, acc, 0.0005, k))
    assert best[0][0] == f"chain-{ref}"
    steep = {1: 0.010, 2: 0.020, 4: 0.040, 8: 0.080, 16: 0.160}  # GEMV-like: linear in M
    assert plan(steep, acc, 0.0005, max_k=8)[0][0] == "none"
    with pytest.raises(SpecqError):
        plan({2: 0.01}, acc, 0.001)
    with pytest.raises(SpecqError):
        plan(flat, [1.5], 0.001)


def toy_profile():
    chain = [0.8, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.4]
    return {"name": "toy", "source": "test", "structures": {
        "chain": {"cond": chain, "nodes": 9, "max_depth": 8, "example_parents": list(range(-1, 8))},
        "tree-10": {"cond": [0.7, 0.6, 0.5, 0.4], "nodes": 10, "max_depth": 4,
                    "example_parents": [-1, 0, 0, 1, 1, 3, 3, 5, 6, 8]},
        "tree-60": {"cond": [0.9, 0.8, 0.7, 0.6], "nodes": 60, "max_depth": 4,
                    "example_parents": [-1] + [0] * 20 + [1] * 20 + [21] * 15 + [41] * 4},
        "tree-30-d3": {"cond": [0.7, 0.6, 0.5, 0.4], "nodes": 30, "max_depth": 4,
                       "example_parents": [-1] + [0] * 10 + [1] * 10 + [11] * 6 + [21] * 3}}}


def test_plan_structures_picks_by_verification_cost():
    from specq.bench.controlled import hier_expected_tokens
    from specq.bench.latency import plan_structures
    prof = toy_profile()
    costs = {"chain_token": 0.0005, "tree": {"tree-10": 0.001, "tree-60": 0.001}, "keep": 0.0001,
             "hier_round": 0.0015, "int_token": 0.0005}
    flat = {m: 0.010 for m in (1, 2, 4, 8, 16, 32, 64)}
    ranked = plan_structures(flat, prof, costs)
    assert ranked[0]["name"] == "tree-60"                  # flat cost: the biggest, best-accepted tree
    by = {r["name"]: r for r in ranked}
    assert by["tree-60"]["tau"] == pytest.approx(1 + 0.9 + 0.72 + 0.504 + 0.3024)
    assert by["hier-6"]["tau"] == pytest.approx(hier_expected_tokens(prof, "tree-30-d3", 6))
    assert by["none"]["tok_s"] == pytest.approx(100.0)
    steep = {m: 0.010 * m for m in (1, 2, 4, 8, 16, 32, 64)}
    assert plan_structures(steep, prof, costs)[0]["name"] == "none"
    mid = {1: 0.010, 2: 0.0102, 4: 0.0105, 8: 0.011, 16: 0.02, 32: 0.04, 64: 0.08}   # cheap up to 8 tokens
    best = plan_structures(mid, prof, costs)[0]
    assert best["kind"] in ("chain", "hier") and best["name"] != "tree-60"
    assert plan_structures(flat, prof, {}, plain_s=0.005)[0]["name"] == "none"  # no proposer measured
    with pytest.raises(SpecqError):
        plan_structures({2: 0.01}, prof, costs)


def test_tau_bound_caps_every_planned_speedup():
    """tau_bound: the largest expected tau of the profile's structures; no structure's planned speedup over plain
    decoding exceeds it, even with free drafting and verification; the bundled SmolLM2 profile's bound is < 3."""
    from specq.bench.controlled import load_profile
    from specq.bench.latency import plan_structures, tau_bound
    prof = toy_profile()
    b = tau_bound(prof, ["tree-10", "tree-60"])
    assert b["structure"] == "tree-60" and b["tau"] == pytest.approx(1 + 0.9 + 0.72 + 0.504 + 0.3024)
    free = {"chain_token": 0.0, "tree": {"tree-10": 0.0, "tree-60": 0.0}, "hier_round": 0.0}
    ranked = plan_structures({m: 0.01 for m in (1, 2, 4, 8, 16, 32, 64)}, prof, free)
    assert max(r["tok_s"] for r in ranked) == pytest.approx(b["tau"] / 0.01)
    assert tau_bound(prof)["tau"] < b["tau"]                 # without the trees: chains and hier only
    smol = tau_bound(load_profile(None), ["tree-10", "tree-30-d3", "tree-60"])
    assert 2.5 < smol["tau"] < 3.0 + 0.2 and smol["structure"].startswith(("chain", "hier"))
