"""Speculative engine speed on GPU with RANDOM-WEIGHT SmolLM2-shaped models (speed does not depend on
the weights; acceptance does, so tau here is not a quality figure).

    PYTHONPATH=$PWD python3 bench/spec_step_time.py --tag new --out $OUT/step_new.json

Target: SmolLM2-135M shape (30 layers, d 576, 9/3 heads, ffn 1536, vocab 49152, tied), bf16, random.
EAGLE head: random. Draft / intermediate: an exact copy of the target (every draft accepted at T=0:
the draft path's cost at full acceptance). Per method: tokens/s, verification steps, tau, ms per step
(median of --reps generations of --new-tokens after one warm-up generation that captures graphs),
and plain decoding (specq.generate, CUDA-graph step) as the peer in the same process.
Runs the engine that PYTHONPATH imports, so an old checkout can be timed the same way.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from specq.engine import SpecEngine
from specq.models.config import ModelConfig
from specq.models.llama import Transformer
from specq.sampling import SamplingParams

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
               tie_word_embeddings=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_model(seed, dev, dtype):
    torch.manual_seed(seed)
    with torch.device(dev):
        m = Transformer(ModelConfig(**SMOLLM2))
    return m.to(dtype).eval()      # default init: N(0, 1) tied embeddings give sharp logits (few near-ties)


def proposer(name, target, head, draft):
    if name == "none":
        return None
    if name == "ngram":
        from specq.spec.ngram import NgramProposer
        return NgramProposer(5)
    if name == "eagle":
        from specq.spec.eagle import EagleProposer
        return EagleProposer(head, target, top_k=10, depth=6, total_tokens=60)
    from specq.spec.draft_model import DraftModelProposer
    if name == "draft":
        return DraftModelProposer(draft, k=5)
    if name == "multi":
        return DraftModelProposer(draft, k=4, n_drafts=2, scheme="wo")
    if name == "hier":
        from specq.spec.eagle import EagleProposer
        from specq.spec.hier import HierProposer
        return HierProposer(draft, EagleProposer(head, draft, top_k=10, depth=6, total_tokens=60), min_draft_length=6)
    raise SystemExit(f"unknown method {name}")


def time_method(name, target, head, draft, prompt, n, reps, T, vm=None):
    sp = SamplingParams(T)
    runs = []
    for r in range(reps + 1):
        eng = SpecEngine(target, proposer(name, target, head, draft), sp, vm, seed=r)
        sync(); t0 = time.perf_counter()
        out, m = eng.generate(prompt, n)
        sync(); dt = time.perf_counter() - t0
        if r:
            runs.append((dt, m, out))
    dt, m, out = sorted(runs, key=lambda x: x[0])[len(runs) // 2]
    return {"method": name, "temperature": T, "verify": vm or "auto", "tok_s": len(out) / dt, "steps": m.steps,
            "tau": m.tau, "ms_per_step": 1e3 * (dt - m.t_prefill) / max(m.steps, 1), "seconds": dt, "tokens": len(out),
            "out": out}


def plain_peer(target, prompt, n, reps):
    from specq.generate import generate
    ts, out = [], None
    for r in range(reps + 1):
        sync(); t0 = time.perf_counter()
        out = generate(target, prompt, n, SamplingParams())
        sync()
        if r:
            ts.append(time.perf_counter() - t0)
    return {"method": "plain generate()", "tok_s": n / statistics.median(ts), "out": out}


def cuda_ms(fn, n=50):
    """Median milliseconds of fn() over n calls (CUDA events), after 5 warm-up calls."""
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


@torch.no_grad()
def components(target, head, prompt):
    """New engine only: time of each captured step (replay + its input copies), ms."""
    from specq.spec.eagle import EagleProposer
    from specq.spec.graphs import runner_for
    from specq.models.llama import causal_mask
    out = {}
    P = len(prompt)
    target.setup_cache(1024)
    ids = torch.tensor(prompt, device="cuda")
    pos = torch.arange(P, device="cuda")
    logits, hid = target(ids, pos, pos, causal_mask(0, P, 1024, "cuda"))
    r = runner_for(target)
    for n in (1, 6, 60):
        tok = torch.randint(0, 49152, (n,), device="cuda")
        par = torch.arange(-1, n - 1, device="cuda")
        dep = torch.arange(n, device="cuda")
        anc = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
        out[f"target_tree_walk_n{n}"] = cuda_ms(lambda: r.tree(tok, par, dep, anc, P, "greedy"))
        out[f"target_tree_fwd_n{n}"] = cuda_ms(lambda: r.tree(tok, par, dep, anc, P))
    prop = EagleProposer(head, target, top_k=10, depth=6, total_tokens=60)
    prop.setup(1024)
    prop.prefill(ids, hid, 5)
    out["eagle_propose"] = cuda_ms(lambda: prop.propose(7))
    L0 = prop.len

    def commit():
        prop.len = L0
        prop.commit(ids[:3], hid[:3], 9)
    out["eagle_commit_3"] = cuda_ms(commit)
    return {k: round(v, 4) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="new")
    ap.add_argument("--methods", default="none,ngram,eagle,draft,multi@0.7,hier")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, 2-layer model: check the script runs")
    a = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    if a.smoke:
        dev, dtype = "cpu", torch.float32
        SMOLLM2.update(num_layers=2, vocab_size=512)
    t0 = time.time()
    target = random_model(0, dev, dtype)
    draft = copy.deepcopy(target)
    from specq.spec.eagle import EagleHead
    torch.manual_seed(1)
    head = EagleHead(ModelConfig(**{**SMOLLM2, "num_layers": 1})).to(dev, dtype).bind(target).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, SMOLLM2["vocab_size"], (a.prompt_len,), generator=g).tolist()
    res = {"tag": a.tag, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "rows": [],
           "note": "random weights; tau not meaningful; ms_per_step = (time - prefill) / verification steps"}
    peer = plain_peer(target, prompt, a.new_tokens, a.reps)
    res["rows"].append({k: v for k, v in peer.items() if k != "out"})
    print(f"[{a.tag}] plain generate(): {peer['tok_s']:.1f} tok/s ({time.time() - t0:.0f}s)", flush=True)
    if a.tag != "old" and dev == "cuda":
        try:
            res["components_ms"] = components(target, head, prompt)
            print(f"[{a.tag}] components (ms): {res['components_ms']}", flush=True)
        except Exception as e:
            print(f"[{a.tag}] components FAILED {type(e).__name__}: {e}", flush=True)
    for item in a.methods.split(","):
        name, _, T = item.partition("@")
        try:
            r = time_method(name, target, head, draft, prompt, a.new_tokens, a.reps, float(T or 0))
        except Exception as e:  # keep timing the others
            print(f"[{a.tag}] {item}: FAILED {type(e).__name__}: {e}", flush=True)
            res["rows"].append({"method": name, "error": f"{type(e).__name__}: {e}"})
            continue
        if r["temperature"] == 0:
            r["greedy_equals_plain"] = r["out"] == peer["out"]
        r.pop("out")
        res["rows"].append(r)
        print(f"[{a.tag}] {item}: {r['tok_s']:.1f} tok/s, tau {r['tau']:.2f}, {r['ms_per_step']:.2f} ms/step, "
              f"{r['steps']} steps, same-as-plain {r.get('greedy_equals_plain')} ({time.time() - t0:.0f}s)", flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
