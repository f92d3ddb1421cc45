"""Attention over the paged KV cache: chunk prefill (SDPA) and cascade decode.

Decode is where a resampling engine spends its time, and on a CPU it is dominated by reading the
prefix KV once per branch per step (the measured `generate(num_return_sequences=8)` re-reads and
re-copies a 2048-token prefix 8 times per step). Cascade (shared-prefix) attention reads it once:
the queries of all K branches that share a prefix are stacked into one matmul against the single
prefix KV, each branch's own tail is attended separately, and the two partial softmaxes are merged
with their log-sum-exp. `attend_shared` + `attend_rest` + `merge` is exactly softmax attention over
the concatenated keys (up to float rounding), which the engine tests check against a full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """Causal attention of a chunk of C queries (positions past..past+C-1) over past + C keys.
    q [1, Hq, C, D], k/v [1, Hkv, past + C, D] -> [1, Hq, C, D]."""
    c = q.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = torch.ones(c, past + c, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def attend_shared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Many queries against one key set, unnormalised. q [Hkv, M, D] (M = branches x query heads
    per KV head), k/v [Hkv, S, D]. Returns (o [Hkv, M, D], row max [Hkv, M, 1], row sum [Hkv, M, 1])."""
    s = torch.matmul(q, k.transpose(1, 2)).float().mul_(scale)
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    return torch.matmul(p.to(v.dtype), v).float(), m, l


def attend_rest(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float):
    """Each row's queries against its own keys, padded. q [B, Hkv, G, D], k/v [B, Hkv, T, D] with
    the first lens[b] (>= 1) keys of row b valid. Returns (o, row max, row sum) as attend_shared."""
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    pad = torch.arange(k.shape[2], device=k.device) >= lens[:, None]
    s.masked_fill_(pad[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    return torch.matmul(p.to(v.dtype), v).float(), m, l


def _flash_cpu():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def float_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (0 where valid, -inf elsewhere) from a boolean one."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
                     ) -> torch.Tensor:
    """Normalised attention of each row's queries over its own keys: q [B, Hkv, G, D] (the G query
    heads of a KV head play the role of query positions), k/v [B, Hkv, T, D], mask [B, 1, 1, T]
    additive (0 / -inf) or None. One fused SDPA call."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """As `decode_attention`, also returning the log-sum-exp of the scores [B, Hkv, G] (fp32), so
    partial results over disjoint key sets can be merged (`merge_lse`). On CPU this is the fused
    flash kernel SDPA itself uses; elsewhere plain matmuls."""
    fn = _flash_cpu() if q.device.type == "cpu" else None
    if fn is not None:
        o, lse = fn(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return o, lse
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        s = s + mask.float()
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    o = torch.matmul(p.to(v.dtype), v).float() / l
    return o.to(q.dtype), (m + l.log())[..., 0]


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two normalised partial attentions over disjoint key sets, from their log-sum-exps
    ([..., G] for outputs [..., G, D]); fp32 result."""
    m = torch.maximum(lse1, lse2)
    a1, a2 = (lse1 - m).exp_()[..., None], (lse2 - m).exp_()[..., None]
    return (o1.float() * a1 + o2.float() * a2) / (a1 + a2)


def merge(o1, m1, l1, o2, m2, l2) -> torch.Tensor:
    """Combine two unnormalised partial attentions over disjoint key sets (log-sum-exp merge)."""
    m = torch.maximum(m1, m2)
    a1, a2 = (m1 - m).exp_(), (m2 - m).exp_()
    return (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention of q [M, D] over k/v [S, D], for tests."""
    return torch.softmax((q @ k.T).float() * scale, -1).to(v.dtype) @ v
