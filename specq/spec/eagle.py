"""EAGLE-2 draft head and proposer.

The head reads the target's final-norm feature f_j and the embedding of the *next* token:

    x_j = fc([emb(t_{j+1}) ; f_j])           fc: Linear(2D, D)        (bias as published: optional)
    h_j = Block(x_j)                         one Llama decoder layer, no input_layernorm (as in EAGLE)
    h_j ~ f_{j+1},  lm_head(h_j) -> distribution of t_{j+2}

Embedding and lm_head are the target's (held by reference, never copied or saved). Checkpoints use
the published EAGLE-1/2 layout (fc.weight, fc.bias, layers.0.self_attn.{q,k,v,o}_proj.weight,
layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight) + config.json.

Proposer state: the head's own static KV cache holds positions 0..L-1, position j built from the
target's true feature f_j, and head.outs[j] its output there. propose() grows the EAGLE-2 tree
(tree.grow) in cache slots L.. from head.outs[L-1], each deeper level fed the head's own outputs at
its parents as features; commit() rewrites slots L..L+a-1 with the accepted tokens' true target
features (the tree slots are simply overwritten / no longer attended). Both are static-shape steps
(tensors for L, padded commits): eager on CPU, CUDA graphs on GPU, cached on the head.

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
from ..models.llama import Block, KVCache, rotate
from .base import Draft, Proposer
from .tree import ancestors_static, grow


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
        self.register_buffer("outs", None, persistent=False)   # [cache, D] head outputs per position
        self.cache_size = 0
        self.graphs = None                                 # GraphCache of the proposer's CUDA graphs
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
        w = getattr(lm, "weight", None)                    # None: a quantized head (WQLinear), compute dtype = embed's
        return lm(h.to((w if w is not None else self.shared["embed"].weight).dtype)).float()

    def rope(self, pos):  # pos [...] -> cos, sin [..., hd]
        f = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((f, f), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def inputs(self, ids, feats):  # [..] tokens, [.., D] features -> [.., D]
        x = torch.cat([self.embed(ids).to(self.dtype), feats.to(self.dtype)], dim=-1)
        return self.fc(x)

    def setup_cache(self, size: int, dtype=None, device=None):
        """KV cache and output rows (`outs`, read by the proposer) for `size` positions; growing keeps both."""
        a = self.layers[0].self_attn
        old, old_outs = a.cache, self.outs
        dtype, device = dtype or self.dtype, device or self.fc.weight.device
        a.cache = KVCache(a.nkv, size, a.hd, dtype, device)
        self.outs = torch.zeros(size, self.cfg.hidden_size, dtype=dtype, device=device)
        if old is not None:   # growing: keep what is there
            n = min(size, old.k.shape[1])
            a.cache.k[:, :n] = old.k[:, :n]
            a.cache.v[:, :n] = old.v[:, :n]
            if old_outs is not None:
                self.outs[:n] = old_outs[:n]
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

    def forward_unrolled(self, ids, feats, steps: int = 0) -> list:
        """Training path that also runs the head on its own predictions, as the tree does at depth > 1.

        ids [B, T] (t_{j+1}), feats [B, T, D] (f_j) -> [out_0, ..., out_steps], each [B, T, D].
        out_0[j] = forward_seq (true features, predicts f_{j+1}). Step s >= 1 at index j is the tree node
        at depth s+1 when positions 0..j are committed: input (t_{j+1+s}, out_{s-1}[j]) at rope position
        j+s, attending the true-feature keys at positions <= j, the keys of steps 1..s-1 at index j (its
        tree ancestors) and its own; it predicts f_{j+1+s}. Indices j >= T-s are padding (callers mask)."""
        B, T = ids.shape
        blk = self.layers[0]
        a = blk.self_attn
        rep = a.nh // a.nkv
        dev = ids.device

        def qkv(x, pos):
            cos, sin = self.rope(pos)
            q, k, v = a.qkv_proj(x).split([a.nh * a.hd, a.nkv * a.hd, a.nkv * a.hd], dim=-1)
            q = rotate(q.view(B, T, a.nh, a.hd).transpose(1, 2), cos, sin)      # [B, H, T, hd]
            k = rotate(k.view(B, T, a.nkv, a.hd).transpose(1, 2), cos, sin)
            v = v.view(B, T, a.nkv, a.hd).transpose(1, 2)
            return q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

        def finish(x, y):
            x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, a.nh * a.hd))
            return x + blk.mlp(blk.post_attention_layernorm(x))

        ar = torch.arange(T, device=dev)
        x = self.inputs(ids, feats)
        q, k0, v0 = qkv(x, ar)
        outs = [finish(x, F.scaled_dot_product_attention(q, k0, v0, is_causal=True))]
        causal = ar[None, :] <= ar[:, None]                                      # [T, T]
        eye = torch.eye(T, dtype=torch.bool, device=dev)
        ks, vs = [k0], [v0]
        for s in range(1, steps + 1):
            ids_s = torch.cat([ids[:, s:], ids.new_zeros(B, min(s, T))], 1)[:, :T]
            x = self.inputs(ids_s, outs[-1])
            q, k, v = qkv(x, ar + s)
            ks.append(k)
            vs.append(v)
            mask = torch.cat([causal] + [eye] * s, 1)                          # [T, (s+1) T]
            y = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), attn_mask=mask)
            outs.append(finish(x, y))
        return outs


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
    paths up to depth + 1 drafted tokens, and each propose() runs `depth` head forwards of top_k tokens.
    Defaults 16 / 5 / 80: on SmolLM2 + the bundled head (Spec-Bench, 26 questions, T=0) tau 2.19 vs 2.09
    for 10 / 6 / 60 (bench/spec_tau_sim.py); the head's depth-1 recall is the bottleneck, so width pays.

    Drafts carry their depths and ancestor mask (on the head's device). On CUDA, propose() and
    commit() are CUDA graphs (one for the whole tree growth; one per padded commit size), kept on
    the head and reused by later proposers of the same head; no host syncs."""

    name = "eagle"

    def __init__(self, head: EagleHead, target, top_k: int = 16, depth: int = 5, total_tokens: int = 80,
                 graphs: bool | None = None):
        for n, v in (("top_k", top_k), ("depth", depth), ("total_tokens", total_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecqError(f"invalid EAGLE {n} {v!r}: must be an integer >= 1")
        if total_tokens < 2:
            raise SpecqError(f"invalid EAGLE total_tokens {total_tokens}: must be >= 2 (root + one draft)")
        self.head, self.target = head, target
        if not head.shared:
            head.bind(target)
        self.top_k = min(top_k, target.cfg.vocab_size)
        self.depth, self.total_tokens = depth, total_tokens
        self.max_nodes = total_tokens   # the engine sizes caches with this
        self.len = 0          # head cache positions holding true target features
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self.append_fn, self.grow_fn = self._append_fn, self._grow_fn
        self.compiled = False

    def enable_compile(self) -> None:
        """torch.compile the two static-shape steps (append: symbolic row count; grow: this tree shape) before
        their CUDA graphs are captured (graphs are keyed on it: eager and compiled proposers of one head coexist)."""
        if not self.compiled:
            self.append_fn = torch.compile(self._append_fn, dynamic=True)
            self.grow_fn = torch.compile(self._grow_fn, dynamic=False)
            self.compiled = True

    @property
    def device(self):
        return self.head.fc.weight.device

    @property
    def last(self):  # [D] head output at position len-1 (predicts the root's feature)
        return self.head.outs[self.len - 1]

    def setup(self, size: int) -> None:
        """Preallocate for `size` committed positions (the target's cache size)."""
        self._ensure(size)

    def _ensure(self, n: int):
        """Room for n committed positions + the tree slots + the scratch slot padded rows write."""
        need = n + self.top_k * self.depth + 1
        if self.head.cache_size < need:
            self.head.setup_cache(max(need, self.target.cache_size + self.top_k * self.depth + 1, 2 * self.head.cache_size))

    # -- static-shape steps (eager, or captured in CUDA graphs)
    def _append_fn(self, ids, feats, L, n):
        """Head forward over n of M rows with true features at positions L..L+n-1 (rows >= n: scratch).
        ids [M], feats [M, D], L / n long [1]."""
        head = self.head
        S, M, dev = head.cache_size, ids.shape[0], ids.device
        ar = torch.arange(M, device=dev)
        real = ar < n
        slots = torch.where(real, L + ar, S - 1)
        j = torch.arange(S, device=dev)
        mask = torch.where(real[:, None], j[None, :] <= (L + ar)[:, None], (j == S - 1)[None, :])
        h = head(ids, feats, L + ar, slots, mask)
        head.outs.index_copy_(0, slots, h.to(head.outs.dtype))

    def _grow_fn(self, root, L):
        """The EAGLE-2 tree after position L-1; root, L long [1] -> tokens, parents, depth [N], anc [N, N]."""
        head, k = self.head, self.top_k
        S, dev = head.cache_size, root.device
        prefix = torch.arange(S, device=dev) < L                          # [S]
        last = head.outs.index_select(0, L - 1)[0]                        # [D]
        rows = torch.arange(k, device=dev)
        st = {"i": 0, "out": None, "anc": None}

        def step(toks, parent_pos):          # the k beams at depth i+1
            i = st["i"]
            slots = L + i * k + rows
            if parent_pos is None:
                feats = last.expand(k, -1)
                anc = torch.zeros(k, S, dtype=torch.bool, device=dev)
            else:
                feats = st["out"][parent_pos]                             # the parents' own predicted features
                anc = st["anc"][parent_pos]
            anc.index_put_((rows, slots), torch.ones_like(rows, dtype=torch.bool))   # (no host scalar: graph-safe)
            out = head(toks, feats, (L + i).expand(k), slots, anc | prefix)   # [k, D]
            st.update(i=i + 1, out=out, anc=anc)
            return torch.log_softmax(head.logits(out), dim=-1)

        logp0 = torch.log_softmax(head.logits(last), dim=-1)              # [V]
        tokens, parents, _, depth = grow(root, logp0, step, k, self.depth, self.total_tokens, levels=True)
        return tokens, parents, depth, ancestors_static(parents, self.depth + 1)

    # -- CUDA graphs, cached on the head
    def _graph(self, key, make):
        from .graphs import GraphCache
        if self.head.graphs is None:
            self.head.graphs = GraphCache()
        gc = self.head.graphs
        a = self.head.layers[0].self_attn.cache
        gc.check((self.head.cache_size, a.k.data_ptr(), self.head.outs.data_ptr()))
        return gc.get(key, make)

    def _run(self, ids, feats):  # append m positions with true features
        from .graphs import BUCKETS, bucket, capture
        m, L, dev = ids.shape[0], self.len, self.device
        self._ensure(L + m)
        M = bucket(m)
        if self.use_graphs and M in BUCKETS and M <= 64:
            def build():
                b = {"ids": torch.zeros(M, dtype=torch.long, device=dev),
                     "feats": torch.zeros(M, self.head.cfg.hidden_size, dtype=self.head.dtype, device=dev),
                     "L": torch.zeros(1, dtype=torch.long, device=dev), "n": torch.zeros(1, dtype=torch.long, device=dev)}
                g, _ = capture(lambda: self.append_fn(b["ids"], b["feats"], b["L"], b["n"]))   # n = 0: scratch only
                return g, b, None
            entry = self._graph(("append", M, self.compiled), build)
            if entry is not None:
                g, b, _ = entry
                b["ids"][:m].copy_(ids)
                b["feats"][:m].copy_(feats)
                b["L"].fill_(L)
                b["n"].fill_(m)
                g.replay()
                self.len = L + m
                return
        Lt = torch.full((1,), L, dtype=torch.long, device=dev)
        self.append_fn(ids.to(dev), feats.to(dev, self.head.dtype), Lt, torch.full((1,), m, device=dev))
        self.len = L + m

    def rollback(self, n: int) -> None:
        """Forget committed positions >= n (the hierarchical proposer's intermediate rejected them)."""
        if not 0 < n <= self.len:
            raise SpecqError(f"cannot roll the EAGLE head back to {n} positions (it holds {self.len})")
        self.len = n

    @torch.no_grad()
    def prefill(self, prompt, hidden, first):
        self.len = 0
        ids = torch.cat([prompt.reshape(-1)[1:].to(self.device), torch.full((1,), int(first), device=self.device)])
        self._run(ids, hidden)

    @torch.no_grad()
    def commit(self, tokens, hidden, nxt):
        t = tokens.reshape(-1).to(self.device)
        ids = torch.cat([t[1:], torch.full((1,), int(nxt), dtype=t.dtype, device=self.device)])
        self._run(ids, hidden)

    @torch.no_grad()
    def propose(self, root, sp=None) -> Draft:
        from .graphs import capture
        dev = self.device
        self._ensure(self.len)
        if self.use_graphs:
            def build():   # warm-up grows a tree at the current position: writes only tree slots
                b = {"root": torch.full((1,), int(root), dtype=torch.long, device=dev),
                     "L": torch.full((1,), self.len, dtype=torch.long, device=dev)}
                return (*capture(lambda: self.grow_fn(b["root"], b["L"]), warmup=2), b)
            entry = self._graph(("grow", self.top_k, self.depth, self.total_tokens, self.compiled), build)
            if entry is not None:
                g, out, b = entry
                b["root"].fill_(int(root))
                b["L"].fill_(self.len)
                g.replay()
                tokens, parents, depth, anc = out
                return Draft(tokens, parents, None, "iid", depth=depth, anc=anc)
        r = torch.full((1,), int(root), dtype=torch.long, device=dev)
        tokens, parents, depth, anc = self.grow_fn(r, torch.full((1,), self.len, dtype=torch.long, device=dev))
        return Draft(tokens, parents, None, "iid", depth=depth, anc=anc)


def load_eagle(path, target, **kw) -> EagleProposer:
    """EagleProposer for `target` from a head folder (kw: top_k, depth, total_tokens)."""
    return EagleProposer(load_head(path, target), target, **kw)
