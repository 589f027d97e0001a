"""Measure acceptance profiles with real drafts on a real model (SmolLM2 by default), for the controlled
end-to-end benchmark (specq.bench.e2e) and the planner.

A profile per draft structure: reach[d-1] = fraction of target verification steps whose accepted path
reached depth d (Metrics.acceptance), and cond[d-1] = reach[d-1] / reach[d-2] (conditional acceptance at
depth d, reach[-1] = 1). Structures (greedy, T=0, Spec-Bench first turns, chat template):
  chain      draft-model chain of `chain_k` tokens (draft: 4-bit RTN copy of the target)
  tree-N     EAGLE-2 tree of N nodes (root included), top_k 10, depth 6 (tree-30-d3: depth 3, the
             hierarchical framework's tree)
The stored profile (specq/bench/acceptance_smollm2.json) was made with one process per structure:
    python -m specq.bench.acceptance --structures chain --max-new-tokens 32 --out /tmp/acc_chain.json   (etc.)
    python -m specq.bench.acceptance --merge /tmp/acc_*.json --max-new-tokens 32 --out specq/bench/acceptance_smollm2.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

TREES = {"tree-10": (10, 6), "tree-20": (20, 6), "tree-30": (30, 6), "tree-60": (60, 6), "tree-30-d3": (30, 3)}


def cond_from_reach(reach: list[float]) -> list[float]:
    """Unconditional reach probabilities per depth -> conditional acceptance per depth."""
    out, prev = [], 1.0
    for r in reach:
        out.append(r / prev if prev > 0 else 0.0)
        prev = r
    return out


def keep_shape(propose, shape: dict):
    """Wrap propose() to remember the parents of the deepest full-size draft seen (an example tree shape)."""
    def f(root, sp):
        d = propose(root, sp)
        depth = int(d.depths().max())
        if shape["parents"] is None or (len(d) >= len(shape["parents"]) and depth > shape["depth"]):
            shape.update(depth=depth, parents=d.parents.tolist())
        return d
    return f


def fast_draft(llm):
    from ..spec.factory import _default_draft
    return _default_draft(llm)


def dequantized_copy(model):
    """Replace every WQLinear by an nn.Linear holding its dequantized weight (what its CPU path computes)."""
    from ..quant.calib import LINEARS, get, set_
    for layer in model.layers:
        for nm in LINEARS:
            q = get(layer, nm)
            lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(q.dequantize().float())
                if q.bias is not None:
                    lin.bias.copy_(q.bias.float())
            set_(layer, nm, lin.to(q.scales.dtype))
    return model


def spec_for(name: str, chain_k: int) -> dict:
    if name == "chain":
        return dict(method="draft", k=chain_k)
    n, depth = TREES[name]
    return dict(method="eagle", total_tokens=n, depth=depth, top_k=10)


def measure(model: str, structures: list[str], per_category: int, max_new: int, chain_k: int = 8,
            device: str = "cpu", partial=None) -> dict:
    """partial(result so far): called after every question (incremental saves of long CPU runs)."""
    from ..api import LLM
    from ..data import bench_questions
    from ..engine import SpecEngine
    from ..sampling import SamplingParams
    from ..spec.factory import make_proposer_factory
    from ..spec.metrics import Metrics
    llm = LLM(model, device=device)
    qs = bench_questions("spec_bench", per_category)
    prompts = [llm.tok.chat([{"role": "user", "content": q["turns"][0]}]) for q in qs]
    sp = SamplingParams()
    out = {}
    for name in structures:
        if name == "chain":   # the 4-bit RTN copy, dequantized once into plain Linears (same numbers, faster on CPU)
            from ..spec.draft_model import DraftModelProposer
            dm = dequantized_copy(fast_draft(llm))
            factory = lambda sp: (DraftModelProposer(dm, k=chain_k), None)  # noqa: E731
        else:
            factory = make_proposer_factory(llm, **spec_for(name, chain_k))
        tot, t0, shape = Metrics(), time.perf_counter(), {"depth": -1, "parents": None}
        for qi, ids in enumerate(prompts):
            prop, vm = factory(sp)
            prop.propose = keep_shape(prop.propose, shape)
            _, m = SpecEngine(llm.model, prop, sp, vm, seed=0).generate(ids, max_new, eos_ids=llm.tok.eos_ids)
            tot = tot + m
            reach = tot.acceptance
            out[name] = {"tau": tot.tau, "steps": tot.steps, "questions": qi + 1, "reach": reach,
                         "cond": cond_from_reach(reach), "nodes": chain_k + 1 if name == "chain" else TREES[name][0],
                         "max_depth": chain_k if name == "chain" else TREES[name][1] + 1, "spec": spec_for(name, chain_k),
                         "example_parents": shape["parents"]}
            print(f"  {name}: {qi + 1} questions, {tot.steps} steps, tau {tot.tau:.2f}", file=sys.stderr, flush=True)
            if partial is not None:
                partial(out)
        print(f"{name:10s} tau {tot.tau:.3f} over {tot.steps} steps, reach "
              f"{' '.join(f'{r:.2f}' for r in reach)} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return {"model": model, "structures": out, "questions": len(prompts), "max_new_tokens": max_new,
            "temperature": 0.0, "command": "python -m specq.bench.acceptance " + " ".join(sys.argv[1:]),
            "device": device if device == "cpu" else torch.cuda.get_device_name(),
            "platform": f"{platform.machine()} torch {torch.__version__}",
            "date": datetime.date.today().isoformat(),
            "note": "real drafts on the real model: chain = 4-bit RTN copy of the target drafting greedily; "
                    "tree-N = the bundled EAGLE-2 head; reach[d-1] = fraction of target steps whose accepted "
                    "path reached depth d; cond = reach[d]/reach[d-1]"}


def merge(paths: list[str], out: str, max_new: int) -> dict:
    """One profile from per-structure runs (structures run in parallel processes)."""
    st = {}
    for p in paths:
        st.update(json.loads(open(p).read())["structures"])
    res = {"model": "smollm2", "name": "smollm2", "structures": st, "max_new_tokens": max_new, "temperature": 0.0,
           "command": "python -m specq.bench.acceptance --structures S --max-new-tokens %d --out S.json (one process "
                      "per structure), then --merge" % max_new,
           "device": "cpu", "platform": f"{platform.machine()} torch {torch.__version__}",
           "date": datetime.date.today().isoformat(),
           "note": "real drafts on SmolLM2-135M-Instruct (fp32, CPU, greedy), Spec-Bench first turns (1 per category, "
                   "chat template): chain = 4-bit RTN copy of the target drafting 8 tokens; tree-N = the bundled EAGLE-2 "
                   "head (top_k 10, depth 6; tree-30-d3: depth 3); reach[d-1] = fraction of target steps whose accepted "
                   "path reached depth d; cond = reach[d]/reach[d-1]; 'questions' = questions completed"}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--structures", default="chain,tree-10,tree-20,tree-30,tree-60,tree-30-d3")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chain-k", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--merge", nargs="+", default=None, help="merge these per-structure JSONs into --out")
    a = p.parse_args(argv)
    if a.merge:
        merge(a.merge, a.out, a.max_new_tokens)
        return 0
    torch.set_num_threads(a.threads)
    def save(structs):
        with open(a.out, "w") as f:
            json.dump({"structures": structs, "partial": True}, f, indent=1)
    res = measure(a.model, a.structures.split(","), a.per_category, a.max_new_tokens, a.chain_k, a.device, save)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
