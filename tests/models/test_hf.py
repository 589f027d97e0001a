"""specq's model == transformers' on tiny random Llama / Qwen2 / Mistral checkpoints saved to disk."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from specq.errors import SpecqError
from specq.models import load_model
from specq.models.hf import load_hf
from specq.models import build
from specq.models.llama import causal_mask, block_mask

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_ckpt(tmp_path, arch, **over):
    kw = dict(TINY, **over)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**kw)
        model = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():  # give norms / biases non-trivial values so bugs show
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    d = tmp_path / arch
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer(d)
    return model, d


def write_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(90)}
    vocab.update({"<s>": 90, "</s>": 91, "[UNK]": 92})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w1{% endif %}"}))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def specq_logits(m, ids):
    P = len(ids)
    m.setup_cache(P + 8)
    pos = torch.arange(P)
    with torch.no_grad():
        return m(torch.tensor(ids), pos, pos, causal_mask(0, P, P + 8))[0]


@pytest.mark.parametrize("arch,over", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "rope_theta": 500000.0}),
    ("qwen2", {}),
    ("mistral", {"head_dim": 32}),
])
def test_logits_match_transformers(tmp_path, arch, over):
    ref, d = make_ckpt(tmp_path, arch, **over)
    m, tok = load_model(str(d))
    ids = torch.randint(0, 97, (150,)).tolist()  # long enough that llama3 rope scaling matters
    torch.testing.assert_close(specq_logits(m, ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
    assert tok.encode("w3 w5") == [3, 5]
    assert tok.chat([{"role": "w2", "content": "w4"}]) == [2, 4, 1]


def test_sharded_checkpoint(tmp_path):
    ref, d = make_ckpt(tmp_path, "llama")
    ref.save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    m, _ = load_model(str(d))
    ids = [1, 2, 3, 4]
    torch.testing.assert_close(specq_logits(m, ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_tree_forward_equals_paths(tmp_path):
    """A tree-masked multi-token forward gives each node the logits of feeding its path one by one;
    keeping one path leaves the cache equal to a cache built from that path alone."""
    _, d = make_ckpt(tmp_path, "llama")
    m, _ = load_model(str(d))
    S = 32
    prompt = [5, 6, 7]
    # tree: 0 root; 1,2 children of 0; 3 child of 1; 4 child of 3; 5 child of 2
    tokens = torch.tensor([8, 10, 11, 12, 13, 14])
    parents = [-1, 0, 0, 1, 3, 2]
    N = len(parents)
    anc = torch.eye(N, dtype=torch.bool)
    depth = [0] * N
    for i in range(1, N):
        anc[i] |= anc[parents[i]]
        depth[i] = depth[parents[i]] + 1
    m.setup_cache(S)
    P = len(prompt)
    with torch.no_grad():
        pp = torch.arange(P)
        m(torch.tensor(prompt), pp, pp, causal_mask(0, P, S))
        slots = P + torch.arange(N)
        pos = P + torch.tensor(depth)
        tree_logits, _ = m(tokens, pos, slots, block_mask(P, anc, S))
    fresh = load_model(str(d))[0]
    for i in range(N):
        path = [j for j in range(N) if anc[i, j]]
        seq = prompt + tokens[path].tolist()
        torch.testing.assert_close(tree_logits[i], specq_logits(fresh, seq)[-1], atol=1e-4, rtol=1e-4)
    # keep path 0 -> 1 -> 3 -> 4 and compare caches with the path alone
    path = [0, 1, 3, 4]
    m.keep(P + torch.tensor(path), P + torch.arange(len(path)))
    seq = prompt + tokens[path].tolist()
    ref = load_model(str(d))[0]
    specq_logits(ref, seq)
    L = len(seq)
    for a, b in zip(m.layers, ref.layers):
        torch.testing.assert_close(a.self_attn.cache.k[:, :L], b.self_attn.cache.k[:, :L], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.self_attn.cache.v[:, :L], b.self_attn.cache.v[:, :L], atol=1e-5, rtol=1e-5)


def test_bad_checkpoints(tmp_path):
    _, d = make_ckpt(tmp_path, "llama")
    with pytest.raises(SpecqError, match="not found"):
        load_model(str(tmp_path / "nope"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text("{not json")
    with pytest.raises(SpecqError, match="malformed config.json"):
        load_model(str(d))
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(SpecqError, match="unsupported architecture"):
        load_model(str(d))
    (d / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32)))
    with pytest.raises(SpecqError, match="shape"):
        load_model(str(d))
    (d / "config.json").write_text(json.dumps(cfg))
    st = next(d.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(SpecqError, match="malformed safetensors"):
        load_model(str(d))
    st.unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SpecqError, match="pickle"):
        load_model(str(d))
