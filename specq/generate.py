"""Plain (non-speculative) decoding: prefill, then 1-token steps; the step is a CUDA graph on GPU."""
from __future__ import annotations

from typing import Callable

import torch

from .errors import SpecqError
from .models.llama import Transformer, causal_mask
from .sampling import SamplingParams, next_token


def check_lengths(model: Transformer, n_prompt: int, max_new_tokens: int, extra: int = 0) -> int:
    """Validate the prompt against the model context; returns max_new_tokens capped to fit."""
    ctx = model.cfg.max_position_embeddings
    if n_prompt == 0:
        raise SpecqError("empty prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SpecqError(f"invalid max_new_tokens {max_new_tokens!r}: must be an integer >= 1")
    if n_prompt + 1 + extra > ctx:
        raise SpecqError(f"prompt of {n_prompt} tokens does not fit the model context of {ctx} tokens")
    return min(max_new_tokens, ctx - n_prompt - extra)


class Decoder:
    """Owns a model's static cache for one sequence. prefill(ids) and step(token) return logits [V]."""

    def __init__(self, model: Transformer, max_len: int, cuda_graph: bool | None = None, compile: bool | str = False,
                 regional: bool | None = None):
        self.model, self.S = model, max_len
        model.setup_cache(max_len)
        dev = model.device
        self.arange = torch.arange(max_len, device=dev)
        self.len = 0
        self.use_graph = (dev.type == "cuda") if cuda_graph is None else cuda_graph
        self.graph = None
        # torch.compile fuses the step's small kernels (norms, rope, SiLU); the CUDA graph then replays them
        # (compile may name a torch.compile mode, e.g. "max-autotune-no-cudagraphs"). Coordinate-descent
        # tuning lets inductor turn the M=1 matmuls into fused Triton reductions (norm/SiLU prologues):
        # measured on the H100, SmolLM2 step 1277 -> 1054 us (bench/dev/decode_variants.py).
        mode = compile if isinstance(compile, str) else None
        if compile and dev.type == "cuda":
            import torch._inductor.config as inductor_config
            inductor_config.coordinate_descent_tuning = True
            from .kernels import pdl
            pdl.configure_inductor(dev)       # sm_90+: inductor's kernels use programmatic dependent launch too
        if compile:   # quantized Linears enter the compiled step as one opaque op each (specq.quant.opaque)
            from .quant.opaque import register_all
            register_all(model)
        # regional: each layer compiled once for all layers (model.compile_blocks), the step itself eager
        # (default: specq.models.llama.COMPILE_BLOCKS)
        if regional is None:
            from .models import llama
            regional = llama.COMPILE_BLOCKS
        if compile and regional:
            model.compile_blocks(mode=mode)     # automatic dynamic shapes, like the runners (one wrapper each)
            self.fn = self._step_eager
        else:
            self.fn = torch.compile(self._step_eager, fullgraph=True, dynamic=False, mode=mode) if compile else self._step_eager
        if self.use_graph:
            self.ids = torch.zeros(1, dtype=torch.long, device=dev)
            self.pos = torch.zeros(1, dtype=torch.long, device=dev)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:  # ids [P]
        P = ids.shape[0]
        dev = self.model.device
        pos = torch.arange(P, device=dev)
        logits = self.model(ids.to(dev), pos, pos, causal_mask(0, P, self.S, dev), return_hidden=False,
                            logits_rows=slice(P - 1, P))
        self.len = P
        return logits[0]

    def _step_eager(self, ids, pos):  # ids, pos [1]
        mask = self.arange[None, :] <= pos[:, None]
        return self.model(ids, pos, pos, mask, return_hidden=False)

    def _greedy(self, ids, pos):  # one greedy step on the buffers: ids <- argmax, pos += 1 (graph-safe)
        from .kernels.argmax import argmax   # one launch on CUDA (torch's argmax elsewhere; SPECQ_NO_ARGMAX=1)
        nxt = argmax(self.fn(ids, pos)[0]).unsqueeze(-1)          # [1], as argmax(-1, keepdim=True)
        ids.copy_(nxt)
        pos.add_(1)
        return nxt

    def _capture(self, fn):
        """CUDA graph of fn(ids, pos) on the static buffers; the buffers are restored after warm-up."""
        saved = self.ids.clone(), self.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up (allocations, lazy init, compilation) before capture
                fn(self.ids, self.pos)
                self.ids.copy_(saved[0]); self.pos.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn(self.ids, self.pos)
        self.ids.copy_(saved[0]); self.pos.copy_(saved[1])
        return g, out

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        if self.len >= self.S:
            raise SpecqError("context is full")
        if self.use_graph:
            # the warm-up writes K/V at the current slot too, harmlessly: step() overwrites it next
            self.ids.fill_(token)
            self.pos.fill_(self.len)
            if self.graph is None:
                self.graph, self.out = self._capture(self.fn)
            self.graph.replay()
            out = self.out[0]
        else:
            dev = self.model.device
            t = torch.tensor([token], device=dev)
            p = torch.tensor([self.len], device=dev)
            out = self.fn(t, p)[0]
        self.len += 1
        return out

    @torch.no_grad()
    def launch_greedy(self, token: int | None) -> None:
        """Enqueue one greedy step without waiting for it: feed `token` (None = the previous greedy output,
        already in the buffer). next_greedy() returns the results in launch order. On GPU the step is a
        graph replay whose [1] result is copied to pinned host memory behind an event, so the host can
        launch step i+1 before it reads token i and the GPU never idles on the per-token sync."""
        if self.len >= self.S:
            raise SpecqError("context is full")
        if not hasattr(self, "ids"):
            dev = self.model.device
            self.ids = torch.zeros(1, dtype=torch.long, device=dev)
            self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        if not hasattr(self, "pending"):
            self.pending, self.nlaunch = [], 0
            if self.use_graph:  # two result slots: at most two steps are in flight
                self.host = [torch.zeros(1, dtype=torch.long).pin_memory() for _ in range(2)]
                self.events = [torch.cuda.Event() for _ in range(2)]
        if token is not None:
            self.ids.fill_(token)
            self.pos.fill_(self.len)
        if self.use_graph:
            if getattr(self, "ggraph", None) is None:
                self.ggraph, self.gout = self._capture(self._greedy)
            self.ggraph.replay()
            k = self.nlaunch % 2
            self.host[k].copy_(self.gout, non_blocking=True)
            self.events[k].record()
            self.pending.append(k)
        else:
            self.pending.append(self._greedy(self.ids, self.pos))
        self.nlaunch += 1
        self.len += 1

    def next_greedy(self) -> int:
        """The token of the oldest launched greedy step (waits for it)."""
        r = self.pending.pop(0)
        if isinstance(r, int):
            self.events[r].synchronize()
            return int(self.host[r])
        return int(r)

    def discard_pending(self) -> None:
        """Drop launched steps whose tokens are not wanted (their K/V slots count as free again)."""
        if getattr(self, "pending", None):
            if self.use_graph:
                torch.cuda.current_stream().synchronize()
            self.len -= len(self.pending)
            self.pending.clear()

    def step_greedy(self, token: int | None) -> int:
        """Greedy step, synchronous: launch_greedy(token) then its token."""
        self.launch_greedy(token)
        return self.next_greedy()


@torch.no_grad()
def generate(model: Transformer, ids, max_new_tokens: int, sp: SamplingParams = SamplingParams(),
             eos_ids=(), on_token: Callable[[int], bool] | None = None, seed: int | None = None,
             decoder: Decoder | None = None) -> list[int]:
    """Plain decoding. ids: prompt token ids. on_token(t) returning False stops early (stop strings).
    Returns the generated ids (EOS included when hit)."""
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    max_new_tokens = check_lengths(model, ids.shape[0], max_new_tokens)
    dec = decoder or Decoder(model, ids.shape[0] + max_new_tokens)
    gen = None
    if not sp.greedy:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
    eos = set(eos_ids)
    out: list[int] = []
    logits = dec.prefill(ids)
    t = next_token(logits, sp, gen)
    if sp.greedy:  # steps run one ahead of the host: step i+1 is enqueued before token i is read
        launched = 0
        if max_new_tokens > 1:
            dec.launch_greedy(t)
            launched = 1
        while True:
            out.append(t)
            if (on_token is not None and on_token(t) is False) or t in eos or len(out) >= max_new_tokens:
                dec.discard_pending()                       # a look-ahead step past a stop
                return out
            if launched < max_new_tokens - 1:
                dec.launch_greedy(None)                     # the graph feeds its own output back
                launched += 1
            t = dec.next_greedy()
    while True:
        out.append(t)
        if (on_token is not None and on_token(t) is False) or t in eos or len(out) >= max_new_tokens:
            return out
        t = next_token(dec.step(t), sp, gen)
