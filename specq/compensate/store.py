"""Compensation residuals inside a specq quantized checkpoint (`specq quantize --compensate ...`).

    DIR/residual.safetensors, per compensated Linear `name` (e.g. layers.0.self_attn.qkv_proj):
        name.codes   int32 [K, N/8]       the 4-bit residual rows (residual.py layout)
        name.scales  float32 [N]          per output channel
        name.stats   float32 [T, n, keep] calibration order statistics (approx selector; absent for exact)
    config.json "quantization"."compensate": {"spec": the --compensate spec as given, "selector": ...}

Loading wraps each WQLinear in a CompensatedLinear again, codes in pinned host memory as at quantization; k comes
from the spec (a k= spec sets it, a budget= spec is tuned on the device that loads it: tune.apply_compensation).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecqError
from . import select as SEL
from .linear import CompensatedLinear, compensated_modules
from .residual import Residual, _pin

FILE = "residual.safetensors"


def tensors_of(model) -> dict:
    """{name.codes / .scales / .stats: tensor} of every CompensatedLinear of model (4-bit residuals only)."""
    out = {}
    for nm, m in compensated_modules(model):
        R = m.residual
        if R.codes is None:
            raise SpecqError(f"{nm}: only 4-bit residuals are saved (this one is kept exactly)")
        out[f"{nm}.codes"] = R.codes.cpu().contiguous()
        out[f"{nm}.scales"] = R.scales.float().cpu().contiguous()
        if m.stats is not None:
            out[f"{nm}.stats"] = m.stats.float().cpu().contiguous()
    return out


def _check(name: str, t: torch.Tensor | None, dtype, shape, p) -> torch.Tensor:
    if t is None:
        raise SpecqError(f"corrupt compensation residuals {p}: {name} missing")
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        want = f"{dtype}{list(shape)}" if shape is not None else str(dtype)
        raise SpecqError(f"corrupt compensation residuals {p}: {name} is {t.dtype}{list(t.shape)}, expected {want}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise SpecqError(f"corrupt compensation residuals {p}: {name} has non-finite values")
    return t


def load(model, ckpt_dir, info: dict) -> None:
    """Wrap model's decoder WQLinears (not lm_head) in CompensatedLinears from ckpt_dir/residual.safetensors
    (in place); info: the config's "compensate" section. k = 0 until tune.apply_compensation sets it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from ..quant.wq import WQLinear
    p = Path(ckpt_dir) / FILE
    sel = info.get("selector") if isinstance(info, dict) else None
    if sel not in ("exact", "approx") or not isinstance(info.get("spec"), str):
        raise SpecqError(f"corrupt quantized checkpoint config {Path(ckpt_dir) / 'config.json'}: compensate "
                         f"section {info!r}")
    try:
        sd = load_file(str(p))
    except (FileNotFoundError, SafetensorError, OSError, RuntimeError) as e:
        raise SpecqError(f"corrupt or missing compensation residuals {p}: {e}") from None
    targets = [(nm, m) for nm, m in model.named_modules() if isinstance(m, WQLinear) and nm != "lm_head"]
    used = set()
    for nm, m in targets:
        K, N = m.in_features, m.out_features
        n, C = SEL.chunking(K)
        codes = _check(f"{nm}.codes", sd.get(f"{nm}.codes"), torch.int32, (K, N // 8), p)
        scales = _check(f"{nm}.scales", sd.get(f"{nm}.scales"), torch.float32, (N,), p)
        stats = sd.get(f"{nm}.stats")
        if sel == "approx" or stats is not None:
            stats = _check(f"{nm}.stats", stats, torch.float32, None, p)
            if stats.dim() != 3 or stats.shape[0] < 1 or stats.shape[1] != n or not 0 < stats.shape[2] <= C:
                raise SpecqError(f"corrupt compensation residuals {p}: {nm}.stats has shape {list(stats.shape)}, "
                                 f"expected [T, {n}, <= {C}]")
        used.update(k for k in (f"{nm}.codes", f"{nm}.scales", f"{nm}.stats") if k in sd)
        cl = CompensatedLinear(m, Residual(codes=_pin(codes), scales=scales), k_chunk=0, selector=sel, stats=stats)
        parent, _, leaf = nm.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, cl)
    extra = sorted(set(sd) - used)
    if extra:
        raise SpecqError(f"corrupt compensation residuals {p}: unexpected {extra[:3]}")
