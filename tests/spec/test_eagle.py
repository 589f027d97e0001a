import json

import pytest
import torch

from specq.errors import SpecqError
from specq.models.config import ModelConfig
from specq.models.llama import Transformer, block_mask, causal_mask
from specq.sampling import SamplingParams
from specq.spec.eagle import EagleHead, EagleProposer, load_head, save_head
from specq.spec import train_eagle as te

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab=64, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers,
                      num_heads=4, num_kv_heads=2, eos_token_ids=[])
    m = Transformer(cfg).eval()
    with torch.no_grad():   # sharper distributions than the default init
        m.lm_head.weight.mul_(8.0)
    return m


def head_for(target, seed=1):
    torch.manual_seed(seed)
    return EagleHead(target.cfg).bind(target).eval()


@torch.no_grad()
def test_tree_mask_forward_equals_paths():
    target = tiny()
    head = head_for(target)
    S, L, D = 64, 7, target.cfg.hidden_size
    g = torch.Generator().manual_seed(3)
    head.setup_cache(S)
    ids = torch.randint(0, 64, (L,), generator=g)
    head(ids, torch.randn(L, D, generator=g), torch.arange(L), torch.arange(L), causal_mask(0, L, S))
    prefix_k = head.layers[0].self_attn.cache.k.clone()
    prefix_v = head.layers[0].self_attn.cache.v.clone()
    parents = [-1, 0, 0, 1, 1, 2, 3, 3]      # a forest rooted at node 0, all nodes drafted
    N = len(parents)
    toks = torch.randint(0, 64, (N,), generator=g)
    feats = torch.randn(N, D, generator=g)
    anc = torch.eye(N, dtype=torch.bool)
    depth = [0] * N
    for i in range(1, N):
        anc[i] |= anc[parents[i]]
        depth[i] = depth[parents[i]] + 1
    slots = torch.arange(L, L + N)
    tree_out = head(toks, feats, L + torch.tensor(depth), slots, block_mask(L, anc, S))
    for i in range(N):
        path = [j for j in range(N) if anc[i, j]]       # ancestors in order (parents precede)
        c = head.layers[0].self_attn.cache
        c.k.copy_(prefix_k)
        c.v.copy_(prefix_v)
        m = len(path)
        out = head(toks[path], feats[path], torch.arange(L, L + m), torch.arange(L, L + m), causal_mask(L, m, S))
        assert torch.allclose(out[-1], tree_out[i], atol=1e-5), i


@torch.no_grad()
def test_forward_seq_equals_cached_forward():
    target = tiny()
    head = head_for(target)
    T, D = 11, target.cfg.hidden_size
    ids = torch.randint(0, 64, (2, T))
    feats = torch.randn(2, T, D)
    seq = head.forward_seq(ids, feats)
    head.setup_cache(T)
    for b in range(2):
        out = head(ids[b], feats[b], torch.arange(T), torch.arange(T), causal_mask(0, T, T))
        assert torch.allclose(out, seq[b], atol=1e-5)


def plain_greedy(target, prompt, n):
    S = len(prompt) + n + 8
    target.setup_cache(S)
    P = len(prompt)
    logits, _ = target(prompt, torch.arange(P), torch.arange(P), causal_mask(0, P, S))
    out = [int(logits[-1].argmax())]
    L = P
    while len(out) < n:
        t = torch.tensor([out[-1]])
        logits, _ = target(t, torch.tensor([L]), torch.tensor([L]), causal_mask(L, 1, S))
        out.append(int(logits[-1].argmax()))
        L += 1
    return out


def spec_greedy(target, prop, prompt, n):
    """Minimal tree-verifying greedy engine over the Proposer interface."""
    S = len(prompt) + n + prop.total_tokens + 8
    target.setup_cache(S)
    P = len(prompt)
    logits, hid = target(prompt, torch.arange(P), torch.arange(P), causal_mask(0, P, S))
    out = [int(logits[-1].argmax())]
    prop.prefill(prompt, hid, out[0])
    L, accepted, steps = P, 0, 0
    while len(out) < n:
        d = prop.propose(out[-1], SamplingParams())
        assert int(d.tokens[0]) == out[-1] and len(d) <= prop.total_tokens
        N = len(d)
        logits, hid = target(d.tokens, L + d.depths(), torch.arange(L, L + N), block_mask(L, d.ancestor_mask(), S))
        ch, node, path = d.children(), 0, [0]
        while True:
            t = int(logits[node].argmax())
            nxt = next((c for c in ch[node] if int(d.tokens[c]) == t), None)
            if nxt is None:
                break
            node = nxt
            path.append(node)
            out.append(t)
            accepted += 1
        bonus = int(logits[node].argmax())
        pt = torch.tensor(path)
        target.keep(L + pt, L + torch.arange(len(path)))
        prop.commit(d.tokens[pt], hid[pt], bonus)
        out.append(bonus)
        L += len(path)
        steps += 1
    return out[:n], accepted, steps, L


@pytest.mark.parametrize("vocab,k,depth,total", [(8, 4, 3, 20), (64, 10, 3, 30), (64, 3, 6, 12)])
@torch.no_grad()
def test_greedy_decode_is_exact(vocab, k, depth, total):
    target = tiny(vocab)
    head = head_for(target)
    prompt = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(5))
    n = 40
    want = plain_greedy(target, prompt, n)
    prop = EagleProposer(head, target, top_k=k, depth=depth, total_tokens=total)
    got, accepted, steps, L = spec_greedy(target, prop, prompt, n)
    assert got == want
    if vocab == 8:
        assert accepted > 0       # the small vocabulary makes the tree hit often: acceptance exercised
    # the head's incremental state equals a fresh prefill over everything the target committed
    seq = torch.cat([prompt, torch.tensor(got)])[:L]
    S = L + 4
    target.setup_cache(S)
    _, hid = target(seq, torch.arange(L), torch.arange(L), causal_mask(0, L, S))
    fresh = EagleProposer(head_for(target), target, top_k=k, depth=depth, total_tokens=total)
    fresh.head.load_state_dict(head.state_dict())
    fresh.prefill(seq, hid, int(got[L - len(prompt)]))
    assert fresh.len == prop.len == L
    assert torch.allclose(fresh.last, prop.last, atol=1e-4)
    # rollback(n) (hierarchical use) restores the state of a prefill over the first n positions
    n0 = L - 3
    prop.rollback(n0)
    fresh.prefill(seq[:n0], hid[:n0], int(seq[n0]))
    assert prop.len == n0 and torch.allclose(fresh.last, prop.last, atol=1e-4)
    with pytest.raises(SpecqError):
        prop.rollback(L + 5)


@torch.no_grad()
def test_with_engine():
    engine = pytest.importorskip("specq.engine")
    target = tiny(vocab=8)
    prompt = torch.randint(0, 8, (6,), generator=torch.Generator().manual_seed(2))
    want = plain_greedy(target, prompt, 30)
    prop = EagleProposer(head_for(target), target, top_k=3, depth=3, total_tokens=12)
    out, m = engine.SpecEngine(target, prop).generate(prompt, 30)
    assert out == want
    # T > 0: the tree is not a sample from q, so q is None and the engine uses the target-only sampler
    sp = SamplingParams(temperature=0.8)
    assert prop.propose(out[-1], sp).q is None
    out, _ = engine.SpecEngine(target, prop, sp=sp, seed=0).generate(prompt, 20)
    assert len(out) == 20 and all(0 <= t < 8 for t in out)


def test_save_load_published_layout(tmp_path):
    target = tiny()
    head = head_for(target)
    save_head(head, tmp_path, dtype=torch.float32)
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert set(sd) == {"fc.weight", "fc.bias", "layers.0.post_attention_layernorm.weight",
                       *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
                       *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["bias"] is True and cfg["hidden_size"] == 64
    loaded = load_head(tmp_path, target)
    ids, feats = torch.randint(0, 64, (1, 6)), torch.randn(1, 6, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_seq(ids, feats), head.forward_seq(ids, feats), atol=1e-6)
    # bf16 save is what ships; unfused tensors keep their published shapes
    save_head(head, tmp_path / "bf", dtype=torch.bfloat16)
    sd = load_file(str(tmp_path / "bf" / "model.safetensors"))
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64) and sd["fc.weight"].dtype == torch.bfloat16
    # a published-style file: no fc bias, an embed_tokens copy, pytorch_model.bin
    sd = {k: v.float() for k, v in sd.items() if k != "fc.bias"}
    sd["embed_tokens.weight"] = torch.zeros(64, 64)
    pub = tmp_path / "pub"
    pub.mkdir()
    torch.save(sd, pub / "pytorch_model.bin")
    (pub / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in ("bias", "specq")}))
    h = load_head(pub, target)
    assert h.fc.bias is None and not hasattr(h.layers[0].input_layernorm, "weight")


def test_load_errors(tmp_path):
    target = tiny()
    with pytest.raises(SpecqError):
        load_head(tmp_path / "nope", target)
    save_head(head_for(target), tmp_path, dtype=torch.float32)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpecqError):
        load_head(tmp_path, target)
    save_head(head_for(target), tmp_path, dtype=torch.float32)
    with pytest.raises(SpecqError):
        load_head(tmp_path, tiny(vocab=32))
    with pytest.raises(SpecqError):
        EagleProposer(head_for(target), target, top_k=0)


def test_training_reduces_loss():
    target = tiny(vocab=64, layers=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(10)]
    data = te.make_dataset(target, prompts, max_new=16, eos_ids=[], gen_batch=4, log=lambda m: None)
    off = data["offsets"].tolist()
    # each sequence: prompt + answer without its last token (the feature of a token comes from feeding it)
    assert len(off) == 11 and all(off[i + 1] - off[i] == len(prompts[i]) + 15 for i in range(10))
    # the packed generation equals plain greedy decoding; the features equal a full forward's
    for i in (0, 7):
        seq = data["tokens"][off[i]:off[i + 1]].long()
        assert seq.tolist()[len(prompts[i]):] == plain_greedy(target, torch.tensor(prompts[i]), 16)[:15]
        n = seq.shape[0]
        target.setup_cache(n)
        _, h = target(seq, torch.arange(n), torch.arange(n), causal_mask(0, n, n))
        torch.testing.assert_close(data["feats"][off[i]:off[i + 1]].float(), h.to(torch.bfloat16).float(),
                                   atol=0.05, rtol=0.05)
    head = EagleHead(target.cfg)
    emb, lm = te.frozen_copy(target)
    head.bind(emb, lm)
    batch = te.make_batch(data, list(range(10)), "cpu")
    with torch.no_grad():
        before = te.head_loss(head, *batch)[0].item()
    hist = te.train_head(head, target, data, epochs=25, lr=3e-3, batch_tokens=160, progress=False, log=lambda m: None)
    head.bind(emb, lm)
    with torch.no_grad():
        after = te.head_loss(head, *batch)[0].item()
    assert after < 0.6 * before and hist[-1] < hist[0]
    assert head.shared["embed"] is emb
    # training on the head's own unrolled predictions (2 extra steps) also learns, at every step
    head2 = EagleHead(target.cfg)
    head2.bind(emb, lm)
    with torch.no_grad():
        _, _, acc0 = te.head_loss(head2, *batch, unroll=2)
    te.train_head(head2, target, data, epochs=25, lr=3e-3, batch_tokens=160, progress=False, log=lambda m: None,
                  unroll=2)
    head2.bind(emb, lm)
    with torch.no_grad():
        _, _, acc1 = te.head_loss(head2, *batch, unroll=2)
    assert len(acc1) == 3 and all(float(b) > float(a) for a, b in zip(acc0, acc1))


@torch.no_grad()
def test_unrolled_steps_equal_the_tree_path():
    """forward_unrolled step s at index j == the head run incrementally: positions 0..j committed with true
    features, then a chain of s nodes each fed the previous node's output (the tree's depth s+1)."""
    target = tiny()
    head = head_for(target)
    T, D = 10, target.cfg.hidden_size
    ids, feats = torch.randint(0, 64, (2, T)), torch.randn(2, T, D)
    outs = head.forward_unrolled(ids, feats, 3)
    assert torch.allclose(outs[0], head.forward_seq(ids, feats), atol=1e-5)
    S = 24
    for b in range(2):
        for j in range(T - 3):
            head.setup_cache(S)
            L = j + 1
            prev = head(ids[b, :L], feats[b, :L], torch.arange(L), torch.arange(L), causal_mask(0, L, S))[-1]
            for s in range(1, 4):
                slot = torch.tensor([L + s - 1])
                prev = head(ids[b, j + s:j + s + 1], prev[None], slot, slot, causal_mask(L + s - 1, 1, S))[0]
                assert torch.allclose(prev, outs[s][b, j], atol=1e-5), (b, j, s)


def test_prompts_are_varied_and_not_benchmark_questions():
    from specq.paths import data_dir
    try:
        data_dir()
    except SpecqError:
        pytest.skip("the shared data folder (../shared/data or $SPECQ_DATA) is not present")

    class Tok:
        def chat(self, msgs):
            return msgs[0]["content"]
    ps = te.build_prompts(Tok(), 200, seed=1)
    assert len(ps) == 200 and len(set(ps)) > 150
    kinds = ("Translate", "Summarize", "function", "Explain", "JSON")
    assert all(any(k in p for p in ps) for k in kinds)
    from specq.data import bench_questions
    bench = {q["turns"][0] for name in ("spec_bench", "mt_bench") for q in bench_questions(name)}
    assert not bench & set(ps)


def test_generation_batches_are_not_length_sorted(monkeypatch):
    """A generation time budget must not keep only the shortest prompts: batches (of similar lengths) run in
    shuffled order, and every prompt's answer lands at its own index."""
    seen = []

    def fake(model, prompts, max_new, eos_ids=(), features=False):
        seen.append(len(prompts[0]))
        return [[7, 8]] * len(prompts), [torch.zeros(len(p) + 1, 4) for p in prompts]
    monkeypatch.setattr(te, "generate_packed", fake)
    prompts = [[1] * n for n in range(1, 65)]
    data = te.make_dataset(None, prompts, 2, (), gen_batch=8, log=lambda m: None)
    assert len(seen) == 8 and seen != sorted(seen)                      # shuffled batch order
    assert data["plens"].tolist() == list(range(1, 65))                 # results back in prompt order
