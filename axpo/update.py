"""The policy-gradient update of one RL step.

1. Old-policy log-probs (and entropies, for logging) of every trajectory with the no-grad fused op.
2. `ppo_epochs` passes over token-budgeted micro-batches: log-probs with grad, the clipped
   surrogate (`axpo.kernels.clipped_policy_loss`) with per-token advantages, backward.
3. The token-mean is global: each micro-batch's loss is scaled by its share of all trained tokens
   of the step across ranks (times the world size, because FSDP averages gradients over ranks), so
   the result does not depend on how tokens were split into micro-batches or ranks.
A NaN/inf loss or gradient skips the optimiser step (weights untouched) and is reported: `skipped`
counts such epochs, and `loss`/`grad_norm` carry the non-finite values (never a 0.0 that reads as
a perfect step).
"""

from __future__ import annotations

import math

import torch

from axpo.batching import micro_batches
from axpo.distributed import Dist, all_reduce_sum, even_batches
from axpo.kernels import clipped_policy_loss
from axpo.policy import PolicyModel, pack


def optimizer_step(policy, optimizer, local_loss: float, grad_clip: float, d: Dist) -> tuple[float, float, bool]:
    """Clip, then step unless the step's global loss or gradient norm is not finite (then the
    gradients are dropped and the weights stay untouched). No gradient outlives the call.
    Returns (global loss, gradient norm, skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    loss_all = all_reduce_sum(local_loss, d)
    skipped = not (math.isfinite(loss_all) and math.isfinite(norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_all, norm, skipped


def _rows(trajs) -> list[dict]:
    return [{"tokens": t.tokens, "pixel_values": t.pixel_values, "grids": [s.grid_thw for s in t.image_spans]}
            for t in trajs]


def _shifted(x: list[torch.Tensor], idx: list[int], L: int) -> torch.Tensor:
    """Per-token values for tokens 1..L-1 of each row (aligned with next-token log-probs)."""
    out = torch.zeros(len(idx), L - 1)
    for r, i in enumerate(idx):
        v = x[i][1:L]
        out[r, :v.numel()] = v
    return out


@torch.no_grad()
def old_logprobs(policy: PolicyModel, rows: list[dict], fmt, budget: int, temperature: float, d: Dist
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    logps: list = [None] * len(rows)
    ents: list = [None] * len(rows)
    for idx, real in even_batches(micro_batches([len(r["tokens"]) for r in rows], budget), d):
        batch = pack([rows[i] for i in idx], fmt.pad, fmt.image_pad, idx)
        lp, en = policy(batch, temperature=temperature, return_entropy=True)
        if not real:
            continue
        for r, i in enumerate(idx):
            n = len(rows[i]["tokens"]) - 1
            # index j-1 holds token j's log-prob; prepend a 0 so index j is token j.
            logps[i] = torch.cat([lp.new_zeros(1), lp[r, :n].float()])
            ents[i] = torch.cat([en.new_zeros(1), en[r, :n].float()])
    return logps, ents


def policy_update(policy: PolicyModel, optimizer, trajs, token_adv: list[torch.Tensor],
                  masks: list[torch.Tensor], *, fmt, d: Dist, budget: int, temperature: float,
                  clip_low: float, clip_high: float, beta: float, agg: str, epochs: int,
                  grad_clip: float, ref_policy: PolicyModel | None = None) -> dict:
    """`ref_policy` (frozen) is needed when beta > 0: the k3 KL to it is added to the loss."""
    if beta > 0 and ref_policy is None:
        raise ValueError("algo.beta > 0 needs a reference policy")
    rows = _rows(trajs)
    old, ents = old_logprobs(policy, rows, fmt, budget, temperature, d)
    ref_logps = old_logprobs(ref_policy, rows, fmt, budget, temperature, d)[0] if beta > 0 else None
    n_tok = sum(float(m.sum()) for m in masks)
    n_seq = sum(1.0 for m in masks if m.sum() > 0)
    g_tok = all_reduce_sum(n_tok, d)
    g_seq = all_reduce_sum(n_seq, d)
    ent_sum = sum(float((e * m).sum()) for e, m in zip(ents, masks))
    stats = {"loss": 0.0, "clip_frac": 0.0, "ratio": 0.0, "kl": 0.0, "grad_norm": 0.0,
             "entropy": all_reduce_sum(ent_sum, d) / max(1.0, g_tok), "trained_tokens": g_tok,
             "skipped": 0.0}
    if g_tok == 0:
        return stats
    batches = even_batches(micro_batches([len(r["tokens"]) for r in rows], budget), d)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for idx, real in batches:
            batch = pack([rows[i] for i in idx], fmt.pad, fmt.image_pad, idx)
            L = batch.input_ids.shape[1]
            mask = _shifted(masks, idx, L) * float(real)
            logp, _ = policy(batch, temperature=temperature, return_entropy=False)
            ref = _shifted(ref_logps, idx, L) if ref_logps is not None else None
            n_local = float(mask.sum())
            if n_local == 0.0:
                # A dummy or all-masked micro-batch: a zero loss still connected to every parameter
                # keeps FSDP's gradient collectives in step.
                (logp * 0.0).sum().backward()
                continue
            # The global denominator makes the sum over micro-batches and ranks the step's mean.
            loss, st = clipped_policy_loss(
                logp, _shifted(old, idx, L), _shifted(token_adv, idx, L), mask,
                clip_low=clip_low, clip_high=clip_high, ref_logp=ref, beta=beta, agg=agg,
                normalizer=g_tok if agg == "token-mean" else g_seq)
            (loss * d.world).backward()   # FSDP averages gradients over ranks; undo that
            total += float(loss.detach())
            w = n_local / g_tok
            stats["clip_frac"] += float(st["clip_frac"]) * w / epochs
            stats["ratio"] += float(st["ratio_mean"]) * w / epochs
            stats["kl"] += float(st.get("kl_mean", 0.0)) * w / epochs
        loss_all, norm, skipped = optimizer_step(policy, optimizer, total, grad_clip, d)
        stats["skipped"] += float(skipped)
        stats["loss"] += loss_all / epochs
        stats["grad_norm"] += norm / epochs
    for k in ("clip_frac", "ratio", "kl"):  # local token-share-weighted means: their sum is global
        stats[k] = all_reduce_sum(stats[k], d)
    return stats
