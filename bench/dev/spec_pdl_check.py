"""Speculative decoding under programmatic dependent launch: the same greedy draft-chain run (Llama-3.2-1B shape,
random W4A16 weights with a W4A16 lm_head, the draft an identical copy, CUDA graphs) must give the same tokens with
SPECQ_PDL=0 and SPECQ_PDL=1 (run the script once per setting; it writes the tokens and plain decoding's to OUT).
    SPECQ_PDL=0 PYTHONPATH=$PWD python3 bench/dev/spec_pdl_check.py /tmp/spec_pdl0.json   (then =1, and compare)"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from specq.bench.randmodel import build_random, config  # noqa: E402
from specq.engine import SpecEngine  # noqa: E402
from specq.generate import generate  # noqa: E402
from specq.kernels import pdl  # noqa: E402
from specq.spec.draft_model import DraftModelProposer  # noqa: E402


@torch.inference_mode()
def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/spec_pdl.json")
    cfg = config("llama3.2-1b")
    target = build_random(cfg, "w4a16", "cuda", torch.bfloat16, seed=0, quant_head=True)
    draft = build_random(cfg, "w4a16", "cuda", torch.bfloat16, seed=0, quant_head=True)
    prompt = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    plain = generate(target, prompt, 96)
    res = {}
    for k in (2, 4, 8):
        eng = SpecEngine(target, DraftModelProposer(draft, k=k), seed=0)
        toks, met = eng.generate(prompt, 96)
        res[f"chain-{k}"] = dict(tokens=toks, tau=met.tau, mismatches_vs_plain=sum(a != b for a, b in zip(toks, plain)))
        print(f"pdl={pdl.enabled('cuda')} chain-{k}: tau {met.tau:.2f}, first mismatch against plain at "
              f"{next((i for i, (a, b) in enumerate(zip(toks, plain)) if a != b), None)}")
    out.write_text(json.dumps(dict(pdl=pdl.enabled("cuda"), env=os.environ.get("SPECQ_PDL"), plain=plain, spec=res)))


if __name__ == "__main__":
    main()
