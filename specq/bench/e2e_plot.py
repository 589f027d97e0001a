"""Plots of an e2e.json (specq.bench.e2e): tokens/s per method next to the roofline, T(M)/T(1) curves,
planner prediction vs measurement.   python -m specq.bench.e2e_plot bench/results/h100/e2e.json"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _best(rows, kind):
    rs = [r for r in rows if r["method"] == kind]
    return max(rs, key=lambda r: r["tok_s"]) if rs else None


def plot(res: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    rows = [r for r in res["rows"] if r["model"] != "smollm2"]
    groups = list(dict.fromkeys((r["model"], r["format"]) for r in rows))
    files = []
    models = list(dict.fromkeys(m for m, _ in groups))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    kinds = [("none", "plain"), ("chain", "best chain"), ("tree", "best EAGLE tree"), ("hier", "best hierarchical")]
    for ax, model in zip(axes[0], models):
        fmts = [f for m, f in groups if m == model]
        for i, (kind, lab) in enumerate(kinds):
            xs, ys, names = [], [], []
            for j, f in enumerate(fmts):
                b = _best([r for r in rows if r["model"] == model and r["format"] == f], kind)
                if b:
                    xs.append(j + (i - 1.5) * 0.2)
                    ys.append(b["tok_s"])
                    names.append(b.get("structure", kind))
            bars = ax.bar(xs, ys, 0.2, label=lab)
            for bar, n in zip(bars, names):
                if kind != "none":
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), n, ha="center", va="bottom",
                            fontsize=6, rotation=90)
        for j, f in enumerate(fmts):
            roof = next(r["roofline_tok_s"] for r in rows if r["model"] == model and r["format"] == f)
            ax.hlines(roof, j - 0.45, j + 0.45, colors="k", linestyles="--", label="weight-bytes roofline" if j == 0 else None)
        ax.set_xticks(range(len(fmts)), fmts)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{model} (random weights, controlled acceptance)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "e2e.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    if res.get("latency"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, f in dict.fromkeys((r["model"], r["format"]) for r in res["latency"]):
            pts = [r for r in res["latency"] if r["model"] == m and r["format"] == f]
            ax.plot([r["M"] for r in pts], [r["ratio_vs_M1"] for r in pts], marker="o", label=f"{m} {f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per target forward M")
        ax.set_ylabel("T(M) / T(1)")
        ax.set_title("verification cost (CUDA-graph forwards)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(out / "e2e.latency.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    pr = [r for r in rows if r.get("predicted_tok_s")]
    if pr:
        fig, ax = plt.subplots(figsize=(5, 5))
        for m, f in groups:
            pts = [r for r in pr if r["model"] == m and r["format"] == f]
            ax.scatter([r["predicted_tok_s"] for r in pts], [r["tok_s"] for r in pts], s=12, label=f"{m} {f}")
        lim = max(max(r["predicted_tok_s"] for r in pr), max(r["tok_s"] for r in pr)) * 1.05
        ax.plot([0, lim], [0, lim], "k--", lw=0.8)
        ax.set_xlabel("planner expected tokens/s")
        ax.set_ylabel("measured tokens/s")
        ax.set_title("planner model vs measurement")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(out / "e2e.planner.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


if __name__ == "__main__":
    p = Path(sys.argv[1])
    print("\n".join(str(f) for f in plot(json.loads(p.read_text()), p.parent)))
