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
