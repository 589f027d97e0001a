"""bench spec's mismatch diagnostic: the plain model's top-2 logit gap where a T=0 output first differs."""
import torch

from specq.api import LLM
from specq.bench.spec import divergence
from tests.models.test_hf import make_ckpt


def test_divergence_reports_gap_and_rank(tmp_path):
    llm = LLM(str(make_ckpt(tmp_path, "llama")[1]))
    ids = llm.tok.encode("w1 w2 w3")
    ref = llm.generate(ids, max_new_tokens=6).ids                        # greedy continuation of ids
    assert divergence(llm, ids, ref, list(ref)) is None                 # identical: nothing to report
    M = llm.model
    n = len(ids) + 2
    pos = torch.arange(n)
    with torch.no_grad():
        lg = M(torch.tensor(ids + ref[:2]), pos, pos, torch.ones(n, M.cache_size, dtype=torch.bool).tril(),
               return_hidden=False)[-1].float()
    assert int(lg.argmax()) == ref[2]                                      # plain decoding's own choice
    second = int(lg.topk(2).indices[1])
    d = divergence(llm, ids, ref, ref[:2] + [second] + ref[3:])
    top = lg.topk(2).values
    assert d["position"] == 2 and d["rank"] == 1
    assert abs(d["top2_gap"] - float(top[0] - top[1])) < 1e-4
