"""Sampling parameters and batched next-token sampling (temperature, top-k, top-p).

Randomness is per row and counter-based: the uniform number behind a seeded row's k-th draw of a
`generate` call is splitmix64(mix(seed) + (k + 1) * golden) computed with torch integer ops, a pure
function of (seed, k). So a row samples the same tokens whatever other rows share its batch, in
whatever order (resume and AXPO branches rely on that), while a whole batch draws with one
vectorised computation instead of one generator call per row. Rows without a seed draw from the
global torch RNG (one call for all of them).

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


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on negative values)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps mod 2^64, as in C)."""
    z = (z ^ _shr(z, 30)) * _i64(_M1)
    z = (z ^ _shr(z, 27)) * _i64(_M2)
    return z ^ _shr(z, 31)


def mix_seed(seed: int) -> int:
    """The per-row key of a seed (pure Python, equal to `_mix64` on one value)."""
    z = (seed + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return _i64(z ^ (z >> 31))


def counter_uniform(keys: torch.Tensor, counters: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1), one per row: a pure function of (key, counter) (splitmix64 of
    key + (counter + 1) * golden), the top 24 bits (53 for float64) as the fraction."""
    z = _mix64(keys + (counters + 1) * _i64(_GOLDEN))
    bits = 53 if dtype == torch.float64 else 24
    return _shr(z, 64 - bits).to(dtype) * (2.0 ** -bits)


def truncate(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits [B, V] with everything outside each row's top-k (0 = all) and
    top-p nucleus (the smallest set of most likely tokens reaching mass top_p) set to -inf."""
    sz, si = torch.sort(z, dim=-1, descending=True)
    rank = torch.arange(z.shape[-1], device=z.device)
    drop = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    p = torch.softmax(sz.masked_fill(drop, float("-inf")), -1)
    drop |= (p.cumsum(-1) - p) >= top_p[:, None]
    return z.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), float("-inf"))


class Sampler:
    """Per-row sampling state of one `generate` call: the rows' parameters as tensors (built once),
    their keys and draw counters. `sample(logits, rows)` draws one token for each listed row."""

    def __init__(self, params: list[SamplingParams], device):
        self.params = list(params)
        dev = self.device = torch.device(device)
        n = len(self.params)
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in self.params]
        self.single_temp = temps[0] if len(set(temps)) == 1 else None
        self.temps = torch.tensor(temps, device=dev, dtype=torch.float32)
        self.greedy = torch.tensor([p.temperature == 0 for p in self.params], device=dev)
        self.any_greedy = bool(self.greedy.any())
        self.all_greedy = bool(self.greedy.all())
        self.trunc = any(p.top_k or p.top_p < 1.0 for p in self.params)
        self.top_k = torch.tensor([p.top_k for p in self.params], device=dev)
        self.top_p = torch.tensor([p.top_p for p in self.params], device=dev, dtype=torch.float32)
        # Banned tokens: one shared index list when every row bans the same set (the agent loop's
        # case), else a [B, V] mask built once for the call.
        banned = {tuple(sorted(set(p.banned_token_ids))) for p in self.params}
        self.ban_all = self.ban_mask = None
        self._banned_mixed = len(banned) > 1
        if len(banned) == 1 and banned != {()}:
            self.ban_all = torch.tensor(next(iter(banned)), device=dev, dtype=torch.long)
        elif self._banned_mixed:   # [B, V] mask, built on the first call (when V is known)
            self._ban_rows = [r for r, p in enumerate(self.params) for _ in p.banned_token_ids]
            self._ban_cols = [t for p in self.params for t in p.banned_token_ids]
        seeded = [p.seed is not None for p in self.params]
        self.seeded = torch.tensor(seeded, device=dev)
        self.all_seeded = all(seeded)
        self.none_seeded = not any(seeded)
        self.keys = torch.tensor([mix_seed(p.seed) if p.seed is not None else 0 for p in self.params],
                                 device=dev, dtype=torch.long)
        self.counters = torch.zeros(n, device=dev, dtype=torch.long)

    def _mask(self, v: int) -> torch.Tensor:
        if self.ban_mask is None or self.ban_mask.shape[1] != v:
            m = torch.zeros(len(self.params), v, dtype=torch.bool, device=self.device)
            m[self._ban_rows, self._ban_cols] = True
            self.ban_mask = m
        return self.ban_mask

    def sample(self, logits: torch.Tensor, rows: torch.Tensor | None = None
               ) -> tuple[list[int], list[float], list[float]]:
        """One token per row of logits [n, V] (fp32); `rows` [n] (long) says which of the call's
        rows they are (default: all, in order). Returns (tokens, log-probs, entropies).

        One log-softmax of the temperature-scaled logits gives the reported log-probs and
        entropies and, with banned tokens zeroed, the weights the token is drawn from (inverse CDF
        against u x total mass, so they need no renormalisation); top-k/top-p rows go through
        `truncate` instead."""
        n = len(self.params) if rows is None else rows.numel()
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        if self.single_temp is not None:
            z_full = logits if self.single_temp == 1.0 else logits / self.single_temp
        else:
            z_full = logits / pick(self.temps)[:, None]
        logp = torch.log_softmax(z_full.float(), -1)
        p = logp.exp()
        plogp = p * logp
        ent = -plogp.masked_fill_(p == 0, 0.0).sum(-1)      # 0 log 0 = 0 (a -inf logit gives p = 0)
        ban = None
        if self.ban_all is not None:
            ban = lambda t, fill: t.index_fill(1, self.ban_all, fill)  # noqa: E731
        elif self._banned_mixed:
            mask = pick(self._mask(logits.shape[1]))
            ban = lambda t, fill: t.masked_fill(mask, fill)  # noqa: E731
        if self.all_greedy:
            targets = (logits if ban is None else ban(logits, float("-inf"))).argmax(-1)
        else:
            if self.trunc:
                z = z_full if ban is None else ban(z_full, float("-inf"))
                w = torch.softmax(truncate(z, pick(self.top_k), pick(self.top_p)), -1)
            else:
                w = p if ban is None else ban(p, 0.0)
            cdf = w.cumsum_(-1) if w is not p else w.cumsum(-1)
            if self.none_seeded:
                u = torch.rand(n, device=self.device, dtype=cdf.dtype)
            else:
                u = counter_uniform(pick(self.keys), pick(self.counters), cdf.dtype)
                if not self.all_seeded:
                    u = torch.where(pick(self.seeded), u, torch.rand(n, device=self.device, dtype=cdf.dtype))
            # u * total < total, so the first index whose cumulative mass exceeds it has p > 0.
            targets = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
            if self.any_greedy:
                greedy = (logits if ban is None else ban(logits, float("-inf"))).argmax(-1)
                targets = torch.where(pick(self.greedy), greedy, targets)
        if rows is None:
            self.counters += 1
        else:
            self.counters.index_add_(0, rows, torch.ones_like(rows))
        lp = logp.gather(1, targets[:, None])[:, 0]
        out = torch.stack([targets.double(), lp.double(), ent.double()]).tolist()   # one transfer
        return [int(t) for t in out[0]], out[1], out[2]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list | None = None
           ) -> tuple[list[int], list[float], list[float]]:
    """One token per row of logits [B, V] (fp32), each row its call's first draw. Returns (tokens,
    log-probs, entropies). `generators` is accepted for compatibility and must be None or all None:
    seeded rows draw from their counter-based stream (see the module docstring)."""
    if generators is not None and any(g is not None for g in generators):
        raise ValueError("sample: per-row torch generators are no longer used; set SamplingParams.seed")
    return Sampler(params, logits.device).sample(logits)
