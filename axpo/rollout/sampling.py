"""Sampling parameters and batched next-token sampling (temperature, top-k, top-p).

Returned log-probs and entropies are those of softmax(logits / temperature), the full
temperature-scaled policy, *before* top-k/top-p truncation: that is the distribution the trainer
recomputes (it applies the same temperature and cannot apply the truncation). With top-k/top-p
the token is drawn from the truncated, renormalised distribution, so the behaviour log-prob is the
untruncated one. temperature == 0 means greedy decoding; its log-probs/entropies are of
softmax(logits) (T = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from axpo.kernels import logprob_entropy
except ImportError:  # the fused kernels are optional; same math in plain PyTorch
    def logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
        z = logits.float() / temperature
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        return logp.gather(-1, targets[:, None])[:, 0], ent


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()   # generation stops after emitting one (it is in the output)
    seed: int | None = None                # per-sequence generator seed, for reproducibility
    # Never sampled (e.g. vision placeholders: a sampled <|image_pad|> has no image behind it and
    # would break the next forward). Like top-k/top-p, this truncates sampling only; the returned
    # log-probs stay those of the full distribution, which is what the trainer recomputes.
    banned_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams: max_tokens must be >= 1, got {self.max_tokens}")
        self.stop_token_ids = tuple(self.stop_token_ids)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]    # of softmax(logits / temperature) at each sampled token (see module doc)
    entropies: list[float]   # of the same distribution
    finish_reason: str       # "stop" | "length"


def truncate(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits [B, V] with everything outside each row's top-k (0 = all) and
    top-p nucleus (the smallest set of most likely tokens reaching mass top_p) set to -inf."""
    sz, si = torch.sort(z, dim=-1, descending=True)
    rank = torch.arange(z.shape[-1], device=z.device)
    drop = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    p = torch.softmax(sz.masked_fill(drop, float("-inf")), -1)
    drop |= (p.cumsum(-1) - p) >= top_p[:, None]
    return z.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), float("-inf"))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> tuple[list[int], list[float], list[float]]:
    """One token per row of logits [B, V] (fp32). Returns (tokens, log-probs, entropies).

    Inverse-CDF sampling, batched: one uniform number per row (from the row's generator when it has
    a seed, else from the global RNG) against the cumulative distribution; per-row multinomial
    calls cost more than the rest of a small model's decode step."""
    dev = logits.device
    temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    z_full = logits / torch.tensor(temps, device=dev, dtype=logits.dtype)[:, None]
    z = z_full
    if any(p.banned_token_ids for p in params):
        z = z_full.clone()
        for r, p in enumerate(params):
            if p.banned_token_ids:
                z[r, list(p.banned_token_ids)] = float("-inf")
    if any(p.top_k or p.top_p < 1.0 for p in params):
        zt = truncate(z, torch.tensor([p.top_k for p in params], device=dev),
                      torch.tensor([p.top_p for p in params], device=dev, dtype=z.dtype))
    else:
        zt = z
    cdf = torch.softmax(zt, -1).cumsum_(-1)
    u = torch.empty(len(params), device=dev, dtype=cdf.dtype)
    for r, g in enumerate(generators):
        if g is not None:
            u[r] = torch.rand((), generator=g, device=dev, dtype=cdf.dtype)
    free = [r for r, g in enumerate(generators) if g is None]
    if free:
        u[free] = torch.rand(len(free), device=dev, dtype=cdf.dtype)
    # u * total < total, so the first index whose cumulative mass exceeds it has p > 0.
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=z.shape[-1] - 1)
    greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
    targets = torch.where(greedy, z.argmax(-1), drawn)
    if len(set(temps)) == 1:   # the common case: the trainer's exact call
        lp, ent = logprob_entropy(logits, targets, temperature=temps[0])
    else:
        lp, ent = logprob_entropy(z_full, targets, temperature=1.0)
    return targets.tolist(), lp.tolist(), ent.tolist()
