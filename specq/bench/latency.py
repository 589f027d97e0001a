"""`specq bench latency`: target forward time T(M) vs number of new tokens M, per format, and the
verification-cost curve T(M)/T(1) that decides how large a draft pays. Also the draft planner.

Planner (used by `specq bench latency --acceptance ...`): for a chain of k drafted tokens with per-depth
conditional acceptance a[d] (P(depth d accepted | depth d-1 accepted)), the expected tokens per target
forward are E(k) = 1 + sum_{d<=k} prod_{i<=d} a[i]; the time per step is T(k+1) + k * t_draft; the best k
maximises E(k) / time. Trees enter as candidates with a measured tau and node count.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch

from ..errors import SpecqError

MS = [1, 2, 4, 8, 16, 32, 64, 128]


def expected_tokens(acc: list[float], k: int) -> float:
    """E[tokens per target forward] of a k-token chain with conditional acceptance acc[d] per depth."""
    e, p = 1.0, 1.0
    for d in range(k):
        p *= acc[d] if d < len(acc) else acc[-1]
        e += p
    return e


def plan(T: dict[int, float], acc: list[float], t_draft: float, max_k: int = 16, trees: dict | None = None):
    """T: {M: seconds} target forward times (interpolated between measured M); acc: conditional acceptance
    per depth; t_draft: seconds per drafted token; trees: {name: (tau, nodes, draft_seconds)}.
    -> list of (name, expected tok/s) best first."""
    if not T or 1 not in T:
        raise SpecqError("the latency curve needs T(1)")
    if any(not 0 <= a <= 1 for a in acc):
        raise SpecqError("acceptance rates must lie in [0, 1]")
    ms = sorted(T)

    def t_of(m):  # piecewise-linear interpolation, flat extrapolation of the last slope
        if m in T:
            return T[m]
        lo = max([x for x in ms if x <= m], default=ms[0])
        hi = min([x for x in ms if x >= m], default=ms[-1])
        if lo == hi:
            return T[lo] * m / lo
        return T[lo] + (T[hi] - T[lo]) * (m - lo) / (hi - lo)

    out = [("none", 1.0 / T[1])]
    for k in range(1, max_k + 1):
        out.append((f"chain-{k}", expected_tokens(acc, k) / (t_of(k + 1) + k * t_draft)))
    for name, (tau, nodes, td) in (trees or {}).items():
        out.append((name, tau / (t_of(nodes) + td)))
    return sorted(out, key=lambda x: -x[1])


def time_forward(model, M: int, reps: int = 10, ctx: int = 256) -> float:
    """Median seconds of one target forward of M new tokens after ctx cached tokens."""
    from ..models.llama import causal_mask
    dev = model.device
    S = ctx + M
    model.setup_cache(S)
    ids = torch.randint(0, model.cfg.vocab_size, (M,), device=dev)
    pos = torch.arange(ctx, ctx + M, device=dev)
    mask = causal_mask(ctx, M, S, dev)
    times = []
    with torch.no_grad():
        for r in range(reps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids, pos, pos, mask, return_hidden=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(a) -> int:
    from ..api import LLM
    ms = [int(m) for m in a.ms.split(",")]
    if not ms or min(ms) < 1:
        raise SpecqError("--ms must list positive token counts")
    if 1 not in ms:
        ms = [1] + ms
    rows = []
    for fmt in a.formats.split(","):
        quant = None if fmt == "none" else dict(fmt=fmt, method="rtn", group_size=a.group_size)
        llm = LLM(a.model, device=a.device, dtype=a.dtype, quant=quant)
        for M in ms:
            t = time_forward(llm.model, M, a.reps)
            rows.append({"format": fmt, "M": M, "ms": t * 1e3})
            print(f"{fmt:6s} M={M:4d} {t * 1e3:8.2f} ms", file=sys.stderr)
    for r in rows:
        t1 = next(x["ms"] for x in rows if x["format"] == r["format"] and x["M"] == 1)
        r["ratio_vs_M1"] = r["ms"] / t1
    res = {"rows": rows, "model": a.model, "command": "specq " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu",
           "date": datetime.date.today().isoformat()}
    if a.acceptance:
        acc = [float(x) for x in a.acceptance.split(",")]
        for fmt in {r["format"] for r in rows}:
            T = {r["M"]: r["ms"] / 1e3 for r in rows if r["format"] == fmt}
            best = plan(T, acc, a.draft_ms / 1e3)
            res.setdefault("plan", {})[fmt] = best[:5]
            print(f"planner [{fmt}]: best {best[0][0]} ({best[0][1]:.1f} tok/s expected)")
    print("| format | M | ms | T(M)/T(1) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['M']} | {r['ms']:.2f} | {r['ratio_vs_M1']:.2f} |")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for fmt in sorted({r["format"] for r in rows}):
            xs = [r["M"] for r in rows if r["format"] == fmt]
            ax.plot(xs, [r["ratio_vs_M1"] for r in rows if r["format"] == fmt], marker="o", label=fmt)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward M")
        ax.set_ylabel("T(M) / T(1)")
        ax.set_title("verification cost")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    return 0


def add_parser(bsub):
    from ..cli import add_model_args
    s = bsub.add_parser("latency", help="target forward time vs tokens per forward (verification-cost curve)",
                        description="Time one target forward of M new tokens for each format and plot T(M)/T(1); "
                                    "with --acceptance, plan the draft size with the best expected tokens/s.")
    add_model_args(s)
    s.add_argument("--formats", default="none,w4a16,w8a8", help="comma list of formats (none = unquantized)")
    s.add_argument("--group-size", type=int, default=128, help="weight group size (default 128)")
    s.add_argument("--ms", default=",".join(map(str, MS)), help="comma list of M (default 1..128 powers of two)")
    s.add_argument("--reps", type=int, default=10, help="timed repetitions per point, median (default 10)")
    s.add_argument("--acceptance", default=None, help="conditional acceptance per depth, e.g. 0.8,0.7,0.6 (enables the planner)")
    s.add_argument("--draft-ms", type=float, default=1.0, help="planner: milliseconds per drafted token (default 1.0)")
    s.add_argument("--out", default=None, help="write JSON here (and a .png plot beside it)")
    s.set_defaults(func=main)
