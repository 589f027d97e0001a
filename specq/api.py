"""Python API: load a model (optionally quantized, optionally with a speculative proposer) and generate.

    llm = specq.LLM("smollm2")
    print(llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=64).text)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import SpecqError
from .models import load_model
from .models.tokenizer import StreamDecoder
from .sampling import SamplingParams


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecqError("--device cuda requested but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SpecqError(f"invalid device {device!r} (cpu, cuda, cuda:N, auto)")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SpecqError(f"invalid dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return table[dtype]


@dataclass
class Completion:
    text: str
    ids: list[int]
    prompt_tokens: int
    finish_reason: str          # "stop" (EOS or stop string) or "length"
    seconds: float
    metrics: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


class LLM:
    def __init__(self, model: str = "smollm2", device: str | None = None, dtype: str | None = None,
                 quant: dict | None = None, spec: dict | None = None, compensate: str | None = None,
                 compile: bool = False):
        self.device = pick_device(device)
        self.compile = compile     # GPU: torch.compile the decode / verification steps (slow first call, fast after)
        self._decoder = None
        self.dtype = pick_dtype(dtype, self.device)
        t0 = time.perf_counter()
        self.model_name = model
        if compensate:                              # a bad spec fails before the (slow) load and quantization
            from .compensate.tune import parse_spec
            parse_spec(compensate)
        self.model, self.tok = load_model(model, dtype=torch.float32 if quant else self.dtype, device="cpu")
        fp = None
        from .compensate.linear import compensated_modules
        saved = bool(compensated_modules(self.model))   # a checkpoint saved by `specq quantize --compensate`
        if compensate and not quant and not saved:
            raise SpecqError("--compensate needs a weight-only --format (w4a16, w3a16, w2a16), or a checkpoint "
                             "saved by `specq quantize --compensate`")
        if quant:
            from .compensate.linear import keep_fp_weights
            from .quant import quantize_model
            with keep_fp_weights() as fp:   # the exact weights each quantized Linear came from (for QDEC)
                quantize_model(self.model, tokenizer=self.tok, fit_group=True, **quant)
        self.model.to(device=self.device, dtype=self.dtype)
        if compensate or saved:                     # saved and no --compensate: the checkpoint's own spec
            from .compensate.tune import apply_compensation
            apply_compensation(self.model, compensate, fp=fp, tokenizer=self.tok)
        self.spec = dict(spec or {})
        self.proposer_factory = None
        if self.spec.get("method", "none") != "none":
            from .spec.factory import make_proposer_factory
            self.proposer_factory = make_proposer_factory(self, **self.spec)
        self.load_seconds = time.perf_counter() - t0

    def _stopper(self, stop: list[str], on_text: Callable[[str], None] | None):
        """Returns (on_token callback, state) implementing stop strings and text streaming."""
        sd = StreamDecoder(self.tok)
        state = {"text": "", "stopped": False}
        held = max((len(s) for s in stop), default=0)  # hold back text that may begin a stop string

        def on_token(t: int) -> bool:
            if t in self.tok.eos_ids:
                return True
            state["text"] += sd.push([t])
            if stop:
                hits = [i for i in (state["text"].find(s) for s in stop) if i >= 0]
                if hits:
                    state["text"] = state["text"][:min(hits)]
                    state["stopped"] = True
            if on_text is not None:
                safe = len(state["text"]) if state["stopped"] else max(0, len(state["text"]) - held + 1) if held else len(state["text"])
                if safe > state.get("sent", 0):
                    on_text(state["text"][state.get("sent", 0):safe])
                    state["sent"] = safe
            return not state["stopped"]

        return on_token, state

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        sp = SamplingParams(temperature, top_k, top_p)
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any((not isinstance(i, int)) or i < 0 or i >= self.model.cfg.vocab_size for i in ids):
            raise SpecqError("prompt token ids out of the vocabulary range")
        stop = [s for s in (stop or []) if s]
        on_token, state = self._stopper(stop, on_text)
        t0 = time.perf_counter()
        metrics = {}
        if self.proposer_factory is None:
            from .generate import generate
            out = generate(self.model, ids, max_new_tokens, sp, eos_ids=self.tok.eos_ids, on_token=on_token, seed=seed,
                           decoder=self._compiled_decoder(len(ids) + max_new_tokens)
                           if self.compile and self.device.type == "cuda" else None)
        else:
            from .engine import SpecEngine
            proposer, method = self.proposer_factory(sp)
            if self.compile and self.device.type == "cuda":   # compiled verification and drafting steps
                from .engine import compile_steps
                compile_steps(self.model, proposer)
            eng = SpecEngine(self.model, proposer, sp, method, seed=seed)
            out, m = eng.generate(ids, max_new_tokens, eos_ids=self.tok.eos_ids, stream=on_token)
            metrics = m.summary()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if on_text is not None and not state["stopped"]:
            rest = state["text"][state.get("sent", 0):]
            if rest:
                on_text(rest)
        hit_eos = bool(out) and out[-1] in self.tok.eos_ids
        reason = "stop" if (state["stopped"] or hit_eos) else "length"
        return Completion(state["text"], out, len(ids), reason, dt, metrics)

    def _compiled_decoder(self, need: int):
        """One compiled Decoder reused across calls (compiling per call would cost seconds each time)."""
        from .generate import Decoder
        ctx = self.model.cfg.max_position_embeddings
        if self._decoder is None or self._decoder.S < need:     # grow at least 2x: each new size recompiles
            old = self._decoder.S if self._decoder is not None else 1024
            self._decoder = Decoder(self.model, min(ctx, max(need, 2 * old)), compile=True)
        return self._decoder

    def chat(self, messages: list[dict], **kw) -> Completion:
        return self.generate(self.tok.chat(messages), **kw)
