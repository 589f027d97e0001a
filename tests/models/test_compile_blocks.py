"""Regional compilation (Transformer.compile_blocks): every layer of a quantized model shares one compiled graph and
the output equals eager decoding; the Decoder's regional mode gives the same greedy tokens."""
import torch
from torch._dynamo.utils import counters

from specq.bench.randmodel import build_random, config
from specq.generate import Decoder
from specq.quant import opaque


@torch.no_grad()
def test_layers_share_one_graph_and_match_eager(monkeypatch):
    monkeypatch.setattr(opaque, "FORCE", True)          # CPU tensors through the opaque op as on CUDA
    model = build_random(config("tiny", num_layers=3), "w4a16", "cpu", torch.float32)
    model.setup_cache(16)
    x, pos = torch.tensor([3, 1, 4]), torch.arange(3)
    mask = torch.ones(3, 16, dtype=torch.bool).tril()
    eager = model(x, pos, pos, mask, return_hidden=False)
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(dynamic=False)
    out = model(x, pos, pos, mask, return_hidden=False)
    # one graph for the three layers (a per-layer constant would compile three), one for the head
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@torch.no_grad()
def test_decoder_regional_greedy_tokens(monkeypatch):
    monkeypatch.setattr(opaque, "FORCE", True)
    model = build_random(config("tiny", num_layers=2), "w4a16", "cpu", torch.float32)
    ids = torch.tensor([5, 7, 11])
    toks = {}
    for regional in (False, True):
        torch._dynamo.reset()
        dec = Decoder(model, 12, cuda_graph=False, compile=regional, regional=regional)
        t = int(dec.prefill(ids).argmax())
        out = [t]
        for _ in range(4):
            t = int(dec.step(t).argmax())
            out.append(t)
        toks[regional] = out
    torch._dynamo.reset()
    assert toks[True] == toks[False]


@torch.no_grad()
def test_prefill_lengths_share_the_compiled_graphs(monkeypatch):
    """After two prompt lengths (automatic dynamic shapes) a new length compiles nothing: the prefill's
    logits_rows slice reaches the compiled head as a tensor, not as constants (one recompile per length before)."""
    monkeypatch.setattr(opaque, "FORCE", True)
    model = build_random(config("tiny", num_layers=2), "w4a16", "cpu", torch.float32)
    torch._dynamo.reset()
    counters.clear()
    dec = Decoder(model, 48, cuda_graph=False, compile=True, regional=True)
    new = []
    for P in (20, 5, 9, 13):
        before = counters["stats"]["unique_graphs"]
        logits = dec.prefill(torch.randint(0, 300, (P,)))
        new.append(counters["stats"]["unique_graphs"] - before)
        assert logits.shape == (model.cfg.vocab_size,)
    assert new[2:] == [0, 0], new
    torch._dynamo.reset()
