"""Build a proposer from user options (CLI / API): models are loaded once, proposers made per request."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecqError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_EAGLE = {"smollm2": ASSETS / "eagle_smollm2"}


def bundled_head(model: str):
    """The bundled EAGLE head for `model`: the "smollm2" alias or a SmolLM2-135M-Instruct file (any quant of the
    GGUF the alias loads), else None."""
    if model in BUNDLED_EAGLE:
        return BUNDLED_EAGLE[model]
    if Path(str(model)).name.lower().startswith("smollm2-135m-instruct"):
        return BUNDLED_EAGLE["smollm2"]
    return None


SCHEME_FOR = {"rrs": "iid", "sampling": "iid", "auto": "iid", "rrs-wo": "wo", "spechub": "spechub"}


def _load_side_model(llm, path: str | None, what: str):
    """A separate model on the target's device: a given checkpoint, or a fresh un-quantized target copy."""
    from ..models import load_model
    if path:
        m, tok = load_model(path, dtype=llm.dtype, device=llm.device)
        if m.cfg.vocab_size != llm.model.cfg.vocab_size:
            raise SpecqError(f"{what} vocabulary ({m.cfg.vocab_size}) differs from the target's ({llm.model.cfg.vocab_size})")
        return m
    m, _ = load_model(llm.model_name, dtype=llm.dtype, device=llm.device)
    return m


def _default_draft(llm):
    """Default draft: a 4-bit (RTN) copy of the target - 'a lower-bit copy of the target'. Made once per LLM."""
    m = getattr(llm, "_spec_default_draft", None)
    if m is not None:
        return m
    from ..models import load_model
    from ..quant import quantize_model
    m, _ = load_model(llm.model_name, dtype=torch.float32, device="cpu")
    quantize_model(m, fmt="w4a16", method="rtn", group_size=128, fit_group=True, progress=False)
    if torch.device(llm.device).type == "cuda":
        _dense(m)   # same 4-bit weights, dense matmuls: fast and capturable for a small draft
    m = m.to(device=llm.device, dtype=llm.dtype)
    llm._spec_default_draft = m
    return m


def _dense(model) -> None:
    """Replace each WQLinear by an nn.Linear holding its dequantized weights (the same values the kernels'
    fallback multiplies by; SmolLM2's K=576 layers use g64, which the W4A16 kernel does not serve)."""
    from ..quant import WQLinear
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, WQLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantize().float())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias.float())
                setattr(mod, cname, lin)


def _eagle(llm, base, head, top_k, depth, total_tokens):
    from .eagle import EagleProposer, load_head
    path = head or bundled_head(llm.model_name)
    if path is None or not Path(path).exists():
        raise SpecqError("--spec eagle/hier needs --eagle-head DIR (a bundled head exists only for smollm2)")
    loaded = []   # the head is loaded once and shared by every proposer (its CUDA graphs live on it)

    def make():
        if not loaded:
            loaded.append(load_head(str(path), base))
        return EagleProposer(loaded[0], base, top_k=top_k, depth=depth, total_tokens=total_tokens)
    return make


def make_proposer_factory(llm, method: str, verify: str = "auto", draft_model=None, intermediate=None,
                          eagle_head=None, k: int = 5, n_drafts: int = 2, top_k: int = 16, depth: int = 5,
                          total_tokens: int = 80, min_draft_length: int = 6):
    """-> f(sp) -> (Proposer, verify method or None for the engine's lossless default). method "auto" lets
    the planner pick (llm.spec_choice records it) and returns None when plain decoding is fastest."""
    for name, v in (("draft length", k), ("n_drafts", n_drafts), ("tree top-k", top_k), ("tree depth", depth),
                    ("tree tokens", total_tokens), ("min draft length", min_draft_length)):
        if not isinstance(v, int) or v < 1:
            raise SpecqError(f"invalid {name} {v!r}: must be an integer >= 1")
    vm = None if verify in (None, "auto") else verify
    if method == "auto":   # planner: measured T(M) + draft costs on this device, stored acceptance profile
        from ..bench.latency import auto_spec
        llm.spec_choice = auto_spec(llm, eagle_head=eagle_head, draft_model=draft_model)
        kw = dict(verify=verify, draft_model=draft_model, intermediate=intermediate, eagle_head=eagle_head, k=k,
                  n_drafts=n_drafts, top_k=top_k, depth=depth, total_tokens=total_tokens,
                  min_draft_length=min_draft_length)
        kw.update(llm.spec_choice["spec"])
        if kw.pop("method") == "none":
            return None    # plain decoding (the caller's non-speculative path)
        return make_proposer_factory(llm, **{"method": llm.spec_choice["spec"]["method"], **kw})
    if method == "ngram":
        from .ngram import NgramProposer
        return lambda sp: (NgramProposer(k), vm)
    if method in ("draft", "multi"):
        from .draft_model import DraftModelProposer
        if method == "multi" and n_drafts < 2:
            raise SpecqError("--spec multi needs --n-drafts >= 2")
        if vm == "spechub" and n_drafts != 2:
            raise SpecqError("--verify spechub verifies exactly 2 drafts: use --n-drafts 2")
        dm = _load_side_model(llm, draft_model, "draft model") if draft_model else _default_draft(llm)
        n = n_drafts if method == "multi" else 1
        scheme = SCHEME_FOR.get(verify or "auto", "iid")
        return lambda sp: (DraftModelProposer(dm, k=k, n_drafts=n, scheme=scheme), vm)
    if method == "eagle":
        make = _eagle(llm, llm.model, eagle_head, top_k, depth, total_tokens)
        return lambda sp: (make(), vm)
    if method == "hier":
        from .hier import HierProposer
        inter = _load_side_model(llm, intermediate, "intermediate model")
        make = _eagle(llm, inter, eagle_head, top_k, depth, total_tokens)
        return lambda sp: (HierProposer(inter, make(), min_draft_length=min_draft_length), vm)
    raise SpecqError(f"unknown speculative method {method!r}")

