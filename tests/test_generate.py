"""Plain greedy decoding: the look-ahead loop (step i+1 launched before token i is read) emits exactly the
tokens of a brute-force argmax over full forwards, stops on EOS/callback/max_new_tokens at the right token,
and leaves the decoder's length at the committed tokens (the look-ahead step is discarded)."""
import torch

from specq.generate import Decoder, generate
from specq.models import load_model
from specq.sampling import SamplingParams
from tests.models.test_hf import make_ckpt


def brute_greedy(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        x = torch.tensor(seq)
        pos = torch.arange(len(seq))
        model.setup_cache(len(seq))
        mask = torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
        logits = model(x, pos, pos, mask, return_hidden=False)
        seq.append(int(logits[-1].argmax()))
    return seq[len(ids):]


def test_lookahead_greedy_matches_brute_force_and_stops(tmp_path):
    _, d = make_ckpt(tmp_path, "llama")
    model, _ = load_model(str(d), dtype=torch.float32)
    ids = [3, 7, 11, 5]
    ref = brute_greedy(model, ids, 12)
    dec = Decoder(model, len(ids) + 12)
    assert generate(model, ids, 12, SamplingParams(), decoder=dec) == ref
    assert dec.len == len(ids) + 11 and not dec.pending        # 11 steps after the prefill, none left over
    # stop on an EOS id: output ends at its first occurrence, the look-ahead step is dropped
    k = 5
    out = generate(model, ids, 12, SamplingParams(), eos_ids=(ref[k],), decoder=dec)
    assert out == ref[:ref.index(ref[k]) + 1]
    assert dec.len == len(ids) + len(out) - 1 and not dec.pending
    # a callback returning False stops after that token
    seen = []
    out = generate(model, ids, 12, SamplingParams(), on_token=lambda t: seen.append(t) or len(seen) < 3, decoder=dec)
    assert out == ref[:3] == seen
    # max_new_tokens=1: prefill only, no step launched
    assert generate(model, ids, 1, SamplingParams(), decoder=dec) == ref[:1]
