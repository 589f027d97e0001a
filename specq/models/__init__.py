"""Model loading: an HF directory, a .gguf file, or a name ("smollm2" = the embedded default)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecqError
from .config import ModelConfig, rope_inv_freq
from .llama import Transformer

DEFAULT_MODEL = "smollm2"


def resolve(name_or_path: str) -> Path:
    if name_or_path == DEFAULT_MODEL:
        from .gguf import default_model_path
        return Path(default_model_path())
    p = Path(name_or_path)
    if not p.exists():
        raise SpecqError(f"model not found: {name_or_path} (give an HF model directory, a .gguf file, or 'smollm2')")
    return p


def build(cfg: ModelConfig, sd: dict, dtype=torch.float32, device="cpu") -> Transformer:
    """Instantiate on the meta device, then take the checkpoint tensors (no double allocation)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)   # buffers are not in the state dict
    want = set(model.state_dict().keys())
    missing, extra = want - set(sd), set(sd) - want
    if missing or extra:
        raise SpecqError(f"checkpoint does not match the config: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, t in model.state_dict().items():
        if tuple(sd[name].shape) != tuple(t.shape):
            raise SpecqError(f"checkpoint tensor {name} has shape {tuple(sd[name].shape)}, config expects {tuple(t.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
    """-> (Transformer, Tokenizer). Quantized specq checkpoints are recognised by their config."""
    p = resolve(name_or_path)
    if p.is_dir():
        qcfg = p / "config.json"
        text = qcfg.read_text(errors="ignore") if qcfg.is_file() else ""
        if '"quantization"' in text:
            from ..quant.checkpoint import load_quantized
            return load_quantized(p, dtype=dtype, device=device)
        if '"quantization_config"' in text:          # a published GPTQ / AWQ checkpoint
            from ..quant.checkpoint import load_hf_quantized
            from .hf import load_hf_config, load_hf_tokenizer
            model = load_hf_quantized(p, dtype=dtype, device=device)
            tok = load_hf_tokenizer(p, load_hf_config(p))
            if tok is None:
                raise SpecqError(f"no tokenizer found for {p} (tokenizer.json is required)")
            return model, tok
        from .hf import load_hf
        cfg, sd, tok = load_hf(p)
    elif p.suffix == ".gguf" or p.is_file():
        from .gguf import load_gguf
        from .hf import convert_hf_state_dict
        cfg, sd, tok = load_gguf(p)
        sd = convert_hf_state_dict(sd, cfg)
    else:
        raise SpecqError(f"cannot load {p}")
    if tok is None:
        raise SpecqError(f"no tokenizer found for {p} (tokenizer.json is required)")
    with torch.no_grad():
        model = build(cfg, sd, dtype=dtype, device=device)
    return model, tok
