"""Controlled acceptance: a drafter that proposes the target's own next token with a given probability per
depth, so speculative decoding can be timed on random-weight models of real shapes.

A profile (measured with real drafts by specq.bench.acceptance) holds per draft structure:
    cond [D]     conditional acceptance per depth: P(depth d accepted | depth d-1 accepted)
    max_depth    deepest draft position the structure can reach
    nodes        draft nodes verified by the target (root included)
    example_parents   a real draft's tree shape (EAGLE trees), used for the verification mask
Each verification step draws its accepted length by walking the depths with these probabilities
(fixed seed), which is what a drafter proposing the target's token with probability cond[d] yields.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import SpecqError

DEFAULT_PROFILE = Path(__file__).with_name("acceptance_smollm2.json")


def load_profile(path: str | Path | None = None) -> dict:
    """-> {"name", "source", "structures": {name: {cond, max_depth, nodes, tau, example_parents}}}."""
    p = Path(path) if path else DEFAULT_PROFILE
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise SpecqError(f"cannot read acceptance profile {p}: {e}") from None
    st = raw.get("structures")
    if not isinstance(st, dict) or "chain" not in st:
        raise SpecqError(f"acceptance profile {p} has no 'structures' with a 'chain' entry")
    for name, s in st.items():
        if any(not 0 <= c <= 1 for c in s["cond"]):
            raise SpecqError(f"acceptance profile {p}: {name} has rates outside [0, 1]")
    name = raw.get("name") or Path(str(raw.get("model", p.stem))).stem.split(".")[0].split("-")[0].lower()
    return {"name": name, "source": str(p), "structures": st}


def cond_at(cond: list[float], d: int) -> float:
    """Conditional acceptance at depth d+1 (0-based d); beyond the measured depths: 0."""
    return cond[d] if d < len(cond) else 0.0


def chain_cond(profile: dict) -> list[float]:
    return profile["structures"]["chain"]["cond"]


def expected_accepted(cond: list[float], max_depth: int) -> float:
    """E[accepted drafts] of one step = sum over depths of the probability of reaching it."""
    e, p = 0.0, 1.0
    for d in range(max_depth):
        p *= cond_at(cond, d)
        e += p
    return e


def accepted_dist(cond: list[float], max_depth: int) -> list[float]:
    """P(accepted = a) for a = 0..max_depth."""
    out, p = [], 1.0
    for d in range(max_depth):
        c = cond_at(cond, d)
        out.append(p * (1 - c))
        p *= c
    return out + [p]


class Acceptance:
    """Seeded draws of accepted lengths."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def draw(self, cond: list[float], max_depth: int) -> int:
        a = 0
        while a < max_depth and self.rng.random() < cond_at(cond, a):
            a += 1
        return a


def hier_stats(tree_cond: list[float], tree_depth: int, min_len: int):
    """Hierarchical drafting: trees are verified by the intermediate model, each adding accepted + 1 tokens,
    until the linear draft has >= min_len tokens. -> (P(chain length n) dict, E[trees per target step])."""
    dist = accepted_dist(tree_cond, tree_depth)
    states, ended, rounds = {0: 1.0}, {}, 0.0
    while states:
        nxt: dict[int, float] = {}
        for n, p in states.items():
            rounds += p
            for a, q in enumerate(dist):
                m = n + a + 1
                if m >= min_len:
                    ended[m] = ended.get(m, 0.0) + p * q
                else:
                    nxt[m] = nxt.get(m, 0.0) + p * q
        states = nxt
    return ended, rounds


def hier_expected_tokens(profile: dict, tree: str, min_len: int) -> float:
    """E[tokens per target step] of hierarchical drafting: chain acceptance over the linear draft + bonus."""
    s = profile["structures"][tree]
    ends, _ = hier_stats(s["cond"], s["max_depth"], min_len)
    return sum(p * (1 + expected_accepted(chain_cond(profile), n)) for n, p in ends.items())


def tree_shape(profile: dict, name: str):
    """parents [N] of the structure's example draft (a chain for 'chain'), as a list."""
    s = profile["structures"][name]
    par = s.get("example_parents")
    if par is None:
        n = s["nodes"]
        par = [-1] + list(range(n - 1))
    return list(par)


def path_to_depth(parents: list[int], a: int) -> list[int]:
    """Node indices root..node of one path of depth a in the tree (the first node found at depth a)."""
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    if a > max(depth):
        raise SpecqError(f"tree of depth {max(depth)} has no path of depth {a}")
    node = depth.index(a)
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def struct_depth(profile: dict, name: str) -> int:
    """Deepest acceptable draft position of a structure: its max depth, capped by its example tree."""
    s = profile["structures"][name]
    par = tree_shape(profile, name)
    depth = [0] * len(par)
    for i in range(1, len(par)):
        depth[i] = depth[par[i]] + 1
    return min(int(s["max_depth"]), max(depth))


def step_tokens_dist(profile: dict, name: str, hier_tree: str = "tree-30-d3") -> dict[int, float]:
    """P(tokens emitted by one target step = t) for chain-K, tree-N (a profile structure) or hier-M."""
    kind, _, size = name.rpartition("-")
    if name in profile["structures"] and name != "chain":
        d = accepted_dist(profile["structures"][name]["cond"], struct_depth(profile, name))
        return {a + 1: p for a, p in enumerate(d)}
    if kind == "chain":
        d = accepted_dist(chain_cond(profile), int(size))
        return {a + 1: p for a, p in enumerate(d)}
    if kind == "hier":
        s = profile["structures"][hier_tree]
        ends, _ = hier_stats(s["cond"], struct_depth(profile, hier_tree), int(size))
        out: dict[int, float] = {}
        for n, pn in ends.items():
            for a, p in enumerate(accepted_dist(chain_cond(profile), n)):
                out[a + 1] = out.get(a + 1, 0.0) + pn * p
        return out
    raise SpecqError(f"unknown structure {name!r} (chain-K, tree-N, hier-M)")


def mean_sd(dist: dict[int, float]) -> tuple[float, float]:
    m = sum(t * p for t, p in dist.items())
    return m, max(0.0, sum(t * t * p for t, p in dist.items()) - m * m) ** 0.5
