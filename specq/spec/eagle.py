"""EAGLE-2 draft head and proposer.

The head reads the target's final-norm feature f_j and the embedding of the *next* token:

    x_j = fc([emb(t_{j+1}) ; f_j])           fc: Linear(2D, D)        (bias as published: optional)
    h_j = Block(x_j)                         one Llama decoder layer, no input_layernorm (as in EAGLE)
    h_j ~ f_{j+1},  lm_head(h_j) -> distribution of t_{j+2}

Embedding and lm_head are the target's (held by reference, never copied or saved). Checkpoints use
the published EAGLE-1/2 layout (fc.weight, fc.bias, layers.0.self_attn.{q,k,v,o}_proj.weight,
layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight) + config.json.

Proposer state: the head's own static KV cache holds positions 0..L-1, position j built from the
target's true feature f_j. propose() grows the EAGLE-2 tree (tree.grow) in cache slots L.. using the
head's own outputs as features; commit() rewrites slots L..L+a-1 with the accepted tokens' true
target features (the tree slots are simply overwritten / no longer attended).

Losslessness: the tree is built by top-k selection, so its nodes are NOT samples from the head's
distribution. Pairing it with sampled multi-draft verification (RRS / SpecHub) would be lossy, so
Draft.q is None and the engine verifies greedily at T=0 and with the target-only tree sampler at
T>0 (sample from the target at each node, descend if the sample is a child): lossless at any T.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SpecqError
from ..models.config import ModelConfig, rope_inv_freq
from ..models.llama import Block, KVCache, causal_mask, rotate
from .base import Draft, Proposer
from .tree import grow


class EagleHead(nn.Module):
    def __init__(self, cfg: ModelConfig, bias: bool = True, embed: nn.Module | None = None,
                 lm_head: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.fc = nn.Linear(2 * D, D, bias=bias)
        self.layers = nn.ModuleList([Block(cfg)])
        self.layers[0].input_layernorm = nn.Identity()     # EAGLE layer 0 has no input norm
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.cache_size = 0
        self.shared: dict = {}                             # target's embed / lm_head, not submodules
        if embed is not None:
            self.bind(embed, lm_head)

    def bind(self, embed: nn.Module, lm_head: nn.Module | None = None):
        """Share a target's modules: bind(target) or bind(embed_tokens, lm_head)."""
        if lm_head is None:
            embed, lm_head = embed.embed_tokens, embed.lm_head
        if embed.weight.shape[1] != self.cfg.hidden_size:
            raise SpecqError(f"EAGLE head hidden size {self.cfg.hidden_size} does not match the target's {embed.weight.shape[1]}")
        self.shared = {"embed": embed, "lm_head": lm_head}
        return self

    @property
    def dtype(self):
        return self.fc.weight.dtype

    def embed(self, ids):
        return self.shared["embed"](ids)

    def logits(self, h):  # [..., D] -> float32 [..., V]
        lm = self.shared["lm_head"]
        return lm(h.to(lm.weight.dtype)).float()

    def rope(self, pos):  # pos [...] -> cos, sin [..., hd]
        f = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((f, f), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def inputs(self, ids, feats):  # [..] tokens, [.., D] features -> [.., D]
        x = torch.cat([self.embed(ids).to(self.dtype), feats.to(self.dtype)], dim=-1)
        return self.fc(x)

    def setup_cache(self, size: int, dtype=None, device=None):
        a = self.layers[0].self_attn
        old = a.cache
        a.cache = KVCache(a.nkv, size, a.hd, dtype or self.dtype, device or self.fc.weight.device)
        if old is not None:   # growing: keep what is there
            n = min(size, old.k.shape[1])
            a.cache.k[:, :n] = old.k[:, :n]
            a.cache.v[:, :n] = old.v[:, :n]
        self.cache_size = size

    def forward(self, ids, feats, pos, slots, mask):
        """ids, pos, slots [M]; feats [M, D]; mask [M, S] -> head features [M, D] (via its KV cache)."""
        cos, sin = self.rope(pos)
        return self.layers[0](self.inputs(ids, feats), cos, sin, slots, mask)

    def forward_seq(self, ids, feats):
        """Training path, no cache: ids [B, T], feats [B, T, D] -> [B, T, D], causal, positions 0..T-1."""
        B, T = ids.shape
        blk = self.layers[0]
        a = blk.self_attn
        x = self.inputs(ids, feats)
        cos, sin = self.rope(torch.arange(T, device=ids.device))      # [T, hd]
        q, k, v = a.qkv_proj(x).split([a.nh * a.hd, a.nkv * a.hd, a.nkv * a.hd], dim=-1)
        q = rotate(q.view(B, T, a.nh, a.hd).transpose(1, 2), cos, sin)   # [B, H, T, hd]
        k = rotate(k.view(B, T, a.nkv, a.hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, a.nkv, a.hd).transpose(1, 2)
        if a.nkv != a.nh:
            k = k.repeat_interleave(a.nh // a.nkv, dim=1)
            v = v.repeat_interleave(a.nh // a.nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, a.nh * a.hd))
        return x + blk.mlp(blk.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- checkpoints

def to_eagle_state_dict(head: EagleHead, dtype=None) -> dict:
    """specq head -> published EAGLE key layout (unfused q/k/v and gate/up)."""
    a = head.layers[0].self_attn
    nq, nk = a.nh * a.hd, a.nkv * a.hd
    out = {}
    for name, t in head.state_dict().items():
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        if ".qkv_proj." in name:
            for p, part in zip("qkv", t.split([nq, nk, nk], dim=0)):
                out[name.replace("qkv_proj", f"{p}_proj")] = part.contiguous()
        elif ".gate_up_proj." in name:
            g, u = t.split(head.cfg.intermediate_size, dim=0)
            out[name.replace("gate_up_proj", "gate_proj")] = g.contiguous()
            out[name.replace("gate_up_proj", "up_proj")] = u.contiguous()
        else:
            out[name] = t
    return out


def from_eagle_state_dict(sd: dict) -> dict:
    """Published EAGLE layout -> specq head state dict (embed_tokens.weight, if present, is dropped)."""
    sd = {k: v for k, v in sd.items() if k != "embed_tokens.weight"}
    out = {}
    pre = "layers.0."
    for k, v in sd.items():
        if not k.startswith(("fc.", pre)):
            raise SpecqError(f"unexpected tensor '{k}' in EAGLE checkpoint (only one-layer EAGLE-1/2 heads are supported)")
    for kind in ("weight", "bias"):
        qkv = [sd.get(f"{pre}self_attn.{p}_proj.{kind}") for p in "qkv"]
        if all(t is not None for t in qkv):
            out[f"{pre}self_attn.qkv_proj.{kind}"] = torch.cat(qkv, 0)
        elif any(t is not None for t in qkv):
            raise SpecqError(f"EAGLE checkpoint has only some of q/k/v_proj.{kind}")
    g, u = sd.get(f"{pre}mlp.gate_proj.weight"), sd.get(f"{pre}mlp.up_proj.weight")
    if g is None or u is None:
        raise SpecqError("EAGLE checkpoint lacks layers.0.mlp.gate_proj/up_proj weights")
    out[f"{pre}mlp.gate_up_proj.weight"] = torch.cat([g, u], 0)
    for k, v in sd.items():
        if not any(s in k for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            out[k] = v
    return out


def head_config_json(head: EagleHead, dtype) -> dict:
    c = head.cfg
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": c.arch,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": c.attention_bias,
        "bias": head.fc.bias is not None, "torch_dtype": str(dtype).replace("torch.", ""),
        "specq": {"kind": "eagle2-head", "feature": "target final-norm output"},
    }


def save_head(head: EagleHead, out_dir, dtype=torch.bfloat16, extra: dict | None = None) -> Path:
    """Write out_dir/model.safetensors (EAGLE layout, `dtype`) and out_dir/config.json."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_eagle_state_dict(head, dtype), str(out / "model.safetensors"))
    cfg = head_config_json(head, dtype)
    if extra:
        cfg["specq"].update(extra)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def load_head(path, target=None, dtype=None, device=None) -> EagleHead:
    """Load an EAGLE-1/2 head: a folder with config.json and model.safetensors (or pytorch_model.bin).
    With `target`, the head is bound to it and takes its dtype / device unless given."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    cj = d / "config.json"
    if not cj.is_file():
        raise SpecqError(f"EAGLE head config not found: {cj}")
    try:
        raw = json.loads(cj.read_text())
    except (OSError, ValueError) as e:
        raise SpecqError(f"cannot read {cj}: {e}") from None
    if p.is_file():
        wf = p
    else:
        wf = next((d / n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).is_file()), None)
        if wf is None:
            raise SpecqError(f"no model.safetensors or pytorch_model.bin in {d}")
    try:
        if wf.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(wf))
        else:
            sd = torch.load(str(wf), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated file
        raise SpecqError(f"cannot read EAGLE weights {wf}: {type(e).__name__}: {e}") from None
    raw = dict(raw)
    raw.setdefault("model_type", "llama")
    raw["num_hidden_layers"] = 1
    cfg = ModelConfig.from_hf(raw)
    sd = from_eagle_state_dict(sd)
    cfg.attention_bias = "layers.0.self_attn.qkv_proj.bias" in sd
    head = EagleHead(cfg, bias="fc.bias" in sd)
    want = head.state_dict()
    missing, extra = set(want) - set(sd), set(sd) - set(want)
    if missing or extra:
        raise SpecqError(f"EAGLE checkpoint does not match its config: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for k, t in want.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise SpecqError(f"EAGLE tensor {k} has shape {tuple(sd[k].shape)}, config expects {tuple(t.shape)}")
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    if target is not None:
        if target.cfg.vocab_size != cfg.vocab_size or target.cfg.hidden_size != cfg.hidden_size:
            raise SpecqError(f"EAGLE head (hidden {cfg.hidden_size}, vocab {cfg.vocab_size}) does not fit the target "
                             f"(hidden {target.cfg.hidden_size}, vocab {target.cfg.vocab_size})")
        head.bind(target)
        dtype = dtype or target.dtype
        device = device or target.device
    return head.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


# ----------------------------------------------------------------------------- proposer

class EagleProposer(Proposer):
    """EAGLE-2 dynamic-tree proposer. total_tokens counts the root: drafts have <= total_tokens nodes,
    paths up to depth + 1 drafted tokens, and each propose() runs `depth` head forwards of top_k tokens."""

    name = "eagle"

    def __init__(self, head: EagleHead, target, top_k: int = 10, depth: int = 6, total_tokens: int = 60):
        for n, v in (("top_k", top_k), ("depth", depth), ("total_tokens", total_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecqError(f"invalid EAGLE {n} {v!r}: must be a positive integer")
        if total_tokens < 2:
            raise SpecqError(f"invalid EAGLE total_tokens {total_tokens}: must be >= 2 (root + one draft)")
        self.head, self.target = head, target
        if not head.shared:
            head.bind(target)
        self.top_k = min(top_k, target.cfg.vocab_size)
        self.depth, self.total_tokens = depth, total_tokens
        self.max_nodes = total_tokens   # the engine sizes caches with this
        self.len = 0          # head cache positions holding true target features
        self.last = None      # [D] head output at position len-1 (predicts the root's feature)
        self.outs = None      # [cache, D] head outputs at committed positions (for rollback)

    @property
    def device(self):
        return self.head.fc.weight.device

    def setup(self, size: int) -> None:
        """Preallocate for `size` committed positions (the target's cache size)."""
        self._ensure(size + self.top_k * self.depth)

    def _ensure(self, n: int):
        if self.head.cache_size < n:
            self.head.setup_cache(max(n, self.target.cache_size + self.top_k * self.depth, 2 * self.head.cache_size))
        if self.outs is None or self.outs.shape[0] < self.head.cache_size:
            outs = torch.zeros(self.head.cache_size, self.head.cfg.hidden_size, dtype=self.head.dtype, device=self.device)
            if self.outs is not None:
                outs[:self.outs.shape[0]] = self.outs
            self.outs = outs

    def _run(self, ids, feats):  # append m positions with true features
        m, L = ids.shape[0], self.len
        self._ensure(L + m + self.top_k * self.depth)
        slots = torch.arange(L, L + m, device=self.device)
        mask = causal_mask(L, m, self.head.cache_size, device=self.device)
        h = self.head(ids.to(self.device), feats.to(self.device), slots, slots, mask)
        self.outs[L:L + m] = h
        self.last = h[-1]
        self.len = L + m

    def rollback(self, n: int) -> None:
        """Forget committed positions >= n (the hierarchical proposer's intermediate rejected them)."""
        if not 0 < n <= self.len:
            raise SpecqError(f"cannot roll the EAGLE head back to {n} positions (it holds {self.len})")
        self.len = n
        self.last = self.outs[n - 1]

    @torch.no_grad()
    def prefill(self, prompt, hidden, first):
        self.len = 0
        ids = torch.cat([prompt.reshape(-1)[1:].to(self.device), torch.tensor([int(first)], device=self.device)])
        self._run(ids, hidden)

    @torch.no_grad()
    def commit(self, tokens, hidden, nxt):
        ids = torch.cat([tokens.reshape(-1)[1:].to(self.device), torch.tensor([int(nxt)], device=self.device)])
        self._run(ids, hidden)

    @torch.no_grad()
    def propose(self, root, sp=None) -> Draft:
        head, k, L, dev = self.head, self.top_k, self.len, self.device
        S = head.cache_size
        prefix = torch.arange(S, device=dev) < L                        # [S]
        st = {"i": 0, "out": None, "anc": None}
        rows = torch.arange(k, device=dev)

        def step(toks, parent_pos):          # the k beams at depth i+1
            i = st["i"]
            slots = L + i * k + rows
            if parent_pos is None:
                feats = self.last.expand(k, -1)
                anc = torch.zeros(k, S, dtype=torch.bool, device=dev)
            else:
                feats = st["out"][parent_pos]
                anc = st["anc"][parent_pos].clone()
            anc[rows, slots] = True
            pos = torch.full((k,), L + i, device=dev)
            out = head(toks, feats, pos, slots, anc | prefix)           # [k, D]
            st.update(i=i + 1, out=out, anc=anc)
            return torch.log_softmax(head.logits(out), dim=-1)

        logp0 = torch.log_softmax(head.logits(self.last), dim=-1)      # [V]
        tokens, parents, _ = grow(int(root), logp0, step, k, self.depth, self.total_tokens)
        return Draft(tokens, parents, q=None, scheme="iid")


def load_eagle(path, target, **kw) -> EagleProposer:
    """EagleProposer for `target` from a head folder (kw: top_k, depth, total_tokens)."""
    return EagleProposer(load_head(path, target), target, **kw)
