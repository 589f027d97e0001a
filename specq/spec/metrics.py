"""Decoding metrics, defined once.

    tau          mean tokens emitted per target verification forward, the bonus/recovered token
                 included (plain decoding: 1.0). Counted before max_new_tokens/EOS truncation, so it
                 measures the drafts, not where the user cut the output.
    acceptance   acceptance[d-1] = fraction of verification steps whose accepted path reached depth d.
    time         prefill / draft (proposer: propose + commit) / verify (target forward + verify +
                 cache keep) / other (bookkeeping, callbacks), seconds. With SpecEngine(split_times=True)
                 CUDA is synchronized at each boundary so the split is honest; by default on CUDA it is
                 not (the GPU runs ahead of the host): then only prefill and total are exact.
    tokens/s     new tokens / total seconds (prefill included); decode tokens/s excludes the prefill
                 and the first token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class Clock:
    """perf_counter that first waits for the GPU when the work runs on CUDA (and sync is on)."""

    def __init__(self, device, sync: bool = True):
        self.cuda = torch.device(device).type == "cuda" and sync

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class Metrics:
    prompt_tokens: int = 0
    new_tokens: int = 0          # tokens returned to the caller (after truncation), first token included
    steps: int = 0               # target verification forwards (prefill excluded)
    emitted: int = 0             # tokens produced by those forwards: sum of (accepted path + 1)
    drafted: int = 0             # draft nodes proposed (roots excluded)
    depth_hits: list[int] = field(default_factory=list)   # [d-1] = steps whose path reached depth d
    t_prefill: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_total: float = 0.0
    extra: dict = field(default_factory=dict)             # proposer-specific stats (e.g. hier levels)

    def record(self, n_nodes: int, n_accepted: int) -> None:
        """One verification step: a draft of n_nodes (root included), n_accepted drafts accepted."""
        self.steps += 1
        self.emitted += n_accepted + 1
        self.drafted += n_nodes - 1
        if n_accepted > len(self.depth_hits):
            self.depth_hits.extend([0] * (n_accepted - len(self.depth_hits)))
        for d in range(n_accepted):
            self.depth_hits[d] += 1

    @property
    def tau(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [h / self.steps for h in self.depth_hits] if self.steps else []

    @property
    def t_other(self) -> float:
        return max(0.0, self.t_total - self.t_prefill - self.t_draft - self.t_verify)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.t_total if self.t_total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.t_total - self.t_prefill
        return (self.new_tokens - 1) / dt if dt > 0 and self.new_tokens > 1 else 0.0

    def __add__(self, o: "Metrics") -> "Metrics":
        """Aggregate over several generations (sums; tau and acceptance stay step-weighted)."""
        n = max(len(self.depth_hits), len(o.depth_hits))
        hits = [(self.depth_hits[i] if i < len(self.depth_hits) else 0) + (o.depth_hits[i] if i < len(o.depth_hits) else 0)
                for i in range(n)]
        extra = dict(self.extra)
        for k, v in o.extra.items():
            extra[k] = extra.get(k, 0) + v if isinstance(v, (int, float)) else v
        return Metrics(self.prompt_tokens + o.prompt_tokens, self.new_tokens + o.new_tokens, self.steps + o.steps,
                       self.emitted + o.emitted, self.drafted + o.drafted, hits, self.t_prefill + o.t_prefill,
                       self.t_draft + o.t_draft, self.t_verify + o.t_verify, self.t_total + o.t_total, extra)

    def summary(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "steps": self.steps,
            "tau": self.tau, "acceptance": self.acceptance, "drafted_per_step": self.drafted / self.steps if self.steps else 0.0,
            "tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
            "time_s": {"prefill": self.t_prefill, "draft": self.t_draft, "verify": self.t_verify,
                       "other": self.t_other, "total": self.t_total},
            **self.extra,
        }

    def __str__(self) -> str:
        acc = " ".join(f"{a:.2f}" for a in self.acceptance[:8])
        return (f"{self.new_tokens} tok in {self.t_total:.2f}s ({self.tokens_per_s:.1f} tok/s) | tau {self.tau:.2f} "
                f"over {self.steps} steps | accept/depth [{acc}] | draft {self.t_draft:.2f}s verify {self.t_verify:.2f}s "
                f"other {self.t_other + self.t_prefill:.2f}s")
