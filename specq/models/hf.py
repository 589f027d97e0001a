"""Load a Hugging Face model directory: config.json, safetensors (single or sharded), tokenizer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import SpecqError
from .config import ModelConfig
from .tokenizer import Tokenizer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def convert_hf_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """HF Llama-style names -> specq names (fused qkv_proj and gate_up_proj). Tensors are not copied
    except where fused. Unknown or missing tensors raise SpecqError."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = _LAYER.match(name)
        if m:
            i, rest = m.groups()
            for group, members in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
                prefix = group.split(".")[0]
                hit = [mem for mem in members if rest in (f"{prefix}.{mem}.weight", f"{prefix}.{mem}.bias")]
                if hit:
                    kind = rest.rsplit(".", 1)[1]
                    parts.setdefault(f"layers.{i}.{group}.{kind}", {})[hit[0]] = t
                    break
            else:
                out[f"layers.{i}.{rest}"] = t
        elif name.startswith("model."):
            out[name[len("model."):]] = t
        elif name == "lm_head.weight":
            out[name] = t
        else:
            raise SpecqError(f"unexpected tensor '{name}' in checkpoint")
    for key, d in parts.items():
        members = ("q_proj", "k_proj", "v_proj") if "qkv_proj" in key else ("gate_proj", "up_proj")
        missing = [m for m in members if m not in d]
        if missing:
            raise SpecqError(f"checkpoint is missing {missing} for {key}")
        out[key] = torch.cat([d[m] for m in members], dim=0)
    if cfg.tie_word_embeddings or "lm_head.weight" not in out:
        if "embed_tokens.weight" not in out:
            raise SpecqError("checkpoint has no embed_tokens.weight")
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def read_safetensors(d: Path) -> dict:
    from safetensors.torch import load_file
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        try:
            files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise SpecqError(f"malformed {idx.name}: {e}") from None
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise SpecqError(f"{d} holds only pickle weights ({pickles[0]}); specq reads safetensors only "
                             "(pickle files can run code): convert them to safetensors first")
        raise SpecqError(f"no *.safetensors weights in {d}")
    sd = {}
    for f in files:
        p = d / f
        if not p.is_file():
            raise SpecqError(f"missing weight shard {p}")
        try:
            sd.update(load_file(str(p)))
        except Exception as e:  # safetensors raises its own error type (not importable on every version)
            raise SpecqError(f"malformed safetensors file {p.name}: {e}") from None
    return sd


def load_hf_config(d: Path) -> ModelConfig:
    p = d / "config.json"
    if not p.is_file():
        raise SpecqError(f"no config.json in {d}")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecqError(f"malformed config.json in {d}: {e}") from None
    if not isinstance(raw, dict):
        raise SpecqError(f"malformed config.json in {d}: not a JSON object")
    cfg = ModelConfig.from_hf(raw)
    gen = d / "generation_config.json"
    if gen.is_file():
        try:
            e = json.loads(gen.read_text()).get("eos_token_id")
            if e is not None:
                cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set([e] if isinstance(e, int) else e))
        except (json.JSONDecodeError, AttributeError):
            pass
    return cfg


def load_hf_tokenizer(d: Path, cfg: ModelConfig) -> Tokenizer | None:
    p = d / "tokenizer.json"
    if not p.is_file():
        return None
    from tokenizers import Tokenizer as HFTok
    try:
        tok = HFTok.from_file(str(p))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise SpecqError(f"malformed tokenizer.json in {d}: {str(e).splitlines()[0]}") from None
    tc = {}
    if (d / "tokenizer_config.json").is_file():
        try:
            tc = json.loads((d / "tokenizer_config.json").read_text())
        except json.JSONDecodeError as e:
            raise SpecqError(f"malformed tokenizer_config.json in {d}: {e}") from None
    template = tc.get("chat_template")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])

    def tok_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        return tok.token_to_id(v) if isinstance(v, str) else None

    bos = tok_id(tc.get("bos_token"))
    if bos is None:
        bos = cfg.bos_token_id
    eos = set(cfg.eos_token_ids)
    e = tok_id(tc.get("eos_token"))
    if e is not None:
        eos.add(e)
    return Tokenizer(tok, template, bos_id=bos, eos_ids=sorted(eos), bos_token=tc.get("bos_token"), eos_token=tc.get("eos_token"))


def load_hf(path, dtype=torch.float32, device="cpu"):
    """HF directory -> (ModelConfig, specq state dict, Tokenizer or None)."""
    d = Path(path)
    if not d.is_dir():
        raise SpecqError(f"model directory not found: {d}")
    cfg = load_hf_config(d)
    sd = convert_hf_state_dict(read_safetensors(d), cfg)
    return cfg, sd, load_hf_tokenizer(d, cfg)
