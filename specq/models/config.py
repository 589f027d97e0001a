"""Model configuration shared by every Llama-family model specq runs (target, intermediate, draft)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import SpecqError

SUPPORTED_ARCHS = {"llama", "mistral", "qwen2"}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0                 # 0 -> hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # Qwen2: bias on q, k, v
    arch: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.arch not in SUPPORTED_ARCHS:
            raise SpecqError(f"unsupported architecture '{self.arch}' (supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise SpecqError(f"invalid model config: {name}={v!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise SpecqError(f"invalid model config: num_heads={self.num_heads} not divisible by num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict."""
        mt = d.get("model_type")
        archs = d.get("architectures") or []
        arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(mt)
        if arch is None:
            raise SpecqError(f"unsupported architecture: model_type={mt!r} architectures={archs} (supported: llama, mistral, qwen2)")
        try:
            eos = d.get("eos_token_id")
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            nh = int(d["num_attention_heads"])
            rs = d.get("rope_scaling") or None
            theta = d.get("rope_theta")
            if theta is None and isinstance(d.get("rope_parameters"), dict):   # transformers >= 5 layout
                rp = d["rope_parameters"]
                theta = rp.get("rope_theta")
                if rp.get("rope_type", "default") != "default":
                    rs = rp
            if rs is not None and rs.get("rope_type", rs.get("type", "default")) in ("default", None):
                rs = None
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                num_heads=nh, num_kv_heads=int(d.get("num_key_value_heads") or nh),
                head_dim=int(d.get("head_dim") or 0), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta if theta is not None else 10000.0), rope_scaling=rs,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", arch == "qwen2")), arch=arch,
                bos_token_id=d.get("bos_token_id"), eos_token_ids=[int(e) for e in eos],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecqError(f"malformed config.json: {type(e).__name__}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies [head_dim/2], with llama3 / linear scaling when configured."""
    import torch
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling
    if not rs:
        return inv.float()
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return (inv / float(rs["factor"])).float()
    if kind == "llama3":
        factor = float(rs["factor"]); lo = float(rs.get("low_freq_factor", 1.0)); hi = float(rs.get("high_freq_factor", 4.0))
        old = float(rs.get("original_max_position_embeddings", 8192))
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        mid = (1 - smooth) * out / factor + smooth * out
        is_mid = (wl >= hi_wl) & (wl <= lo_wl)
        return torch.where(is_mid, mid, out).float()
    raise SpecqError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
