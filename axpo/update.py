"""The policy-gradient update of one RL step.

1. Old-policy log-probs (and entropies, for logging) of every trajectory with the no-grad fused op
   (`old_logprobs`), when they can differ from the update's own: with one epoch the update's
   forward runs on the very weights the old log-probs would come from, so the old log-probs are
   its own detached log-probs (the ratio is exactly 1) and that pass is skipped; the entropies
   then come from the update's forward.
2. `ppo_epochs` passes over token-budgeted micro-batches (grouped by length, `micro_batches`):
   log-probs with grad (the LM head only at the trained tokens, `kept_positions`; each group's
   common prefix, e.g. the prompt of a group of completions up to its image, forwarded once,
   `shared_layout`, under FSDP when every rank's micro-batch shares), the clipped surrogate
   (`axpo.kernels.clipped_policy_loss`) with per-token advantages, backward.
3. The token-mean is global: each micro-batch's loss is scaled by its share of all trained tokens
   of the step across ranks (times the world size, because FSDP averages gradients over ranks), so
   the result does not depend on how tokens were split into micro-batches or ranks.
A NaN/inf loss or gradient skips the optimiser step (weights untouched) and is reported: `skipped`
counts such epochs, and `loss`/`grad_norm` carry the non-finite values (never a 0.0 that reads as
a perfect step).

Devices: every tensor that meets the model, a kernel or a collective is on the policy's device
(its parameters'; `d.device` in the trainer): batches are packed there, the step's masks and
advantages are moved there once, and each micro-batch's per-token tensors (`micro_batch_inputs`,
`supervised_mask`) are built there. Host numbers (token counts) come from the host copies, so no
micro-batch waits on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from axpo.batching import DEFAULT_OVERHEAD_TOKENS, micro_batches
from axpo.distributed import Dist, all_reduce_max, all_reduce_sum, even_batches
from axpo.kernels import clipped_policy_loss
from axpo.policy import PolicyModel, SharedPrefix, pack, shared_prefix


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
    return [{"tokens": t.tokens, "pixel_values": t.pixel_values, "grids": [s.grid_thw for s in t.image_spans],
             "prompt_len": t.prompt_len} for t in trajs]


def policy_device(policy) -> torch.device:
    """Where the policy computes: its parameters' device (an FSDP2 shard's local device)."""
    return next(policy.parameters()).device


def _on(t: torch.Tensor, device: torch.device | str) -> bool:
    device = torch.device(device)
    return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))


def _shifted(x: list[torch.Tensor], idx: list[int], L: int, device: torch.device | str) -> torch.Tensor:
    """Per-token values for tokens 1..L-1 of each row (aligned with next-token log-probs), fp32,
    [len(idx), L-1], zero-padded. The inputs must be on `device` already (moved once per step): a
    tensor elsewhere is an error here rather than a copy per micro-batch or a device mix later."""
    rows = []
    for i in idx:
        v = x[i]
        if not _on(v, device):
            raise ValueError(f"per-token values of row {i} are on {v.device}, the policy on {device}")
        v = v.narrow(0, 1, max(0, min(L, v.shape[0]) - 1)).to(torch.float32)
        rows.append(torch.nn.functional.pad(v, (0, L - 1 - v.shape[0])))
    return torch.stack(rows)


@dataclass
class MicroBatchInputs:
    """The per-token tensors of one micro-batch, [rows, L-1], on the policy's device. `old_logp`
    is None when the old log-probs are the update forward's own (set from it before the loss)."""
    mask: torch.Tensor
    old_logp: torch.Tensor | None
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None
    n_local: float            # trained tokens of the micro-batch (host number)


def micro_batch_inputs(idx: list[int], real: bool, L: int, *, masks: list[torch.Tensor],
                       old: list[torch.Tensor] | None, token_adv: list[torch.Tensor],
                       ref_logps: list[torch.Tensor] | None, n_tokens: list[float],
                       device: torch.device | str) -> MicroBatchInputs:
    """Mask (x0 for a dummy micro-batch), old log-probs, advantages and reference log-probs of the
    rows `idx`, aligned with the next-token log-probs of a batch of width L, built on `device`
    (`old=None`: no old log-probs yet, see MicroBatchInputs). `n_tokens[i]`: row i's trained-token
    count, from the host masks."""
    mask = _shifted(masks, idx, L, device) * float(real)
    ref = _shifted(ref_logps, idx, L, device) if ref_logps is not None else None
    n_local = float(sum(n_tokens[i] for i in idx)) * float(real)
    old_logp = _shifted(old, idx, L, device) if old is not None else None
    return MicroBatchInputs(mask, old_logp, _shifted(token_adv, idx, L, device), ref, n_local)


def micro_batch_loss(logp: torch.Tensor, inp: MicroBatchInputs, *, clip_low: float, clip_high: float,
                     beta: float, agg: str, normalizer: float) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (+ k3 KL) of one micro-batch, scaled by the step's global normalizer.
    Without old log-probs (`inp.old_logp` None) they are `logp` itself, detached: ratio 1."""
    old = inp.old_logp if inp.old_logp is not None else logp.detach()
    return clipped_policy_loss(logp, old, inp.advantages, inp.mask, clip_low=clip_low,
                               clip_high=clip_high, ref_logp=inp.ref_logp, beta=beta, agg=agg,
                               normalizer=normalizer)


def kept_positions(masks: list[torch.Tensor], idx: list[int], L: int, device: torch.device | str) -> torch.Tensor:
    """Flat indices into a micro-batch's [rows, L-1] next-token outputs of its trained tokens
    (`masks[i][j] > 0`, j >= 1, at output position j - 1 of row r: r * (L-1) + j - 1), on
    `device`: the positions whose log-probs the loss reads (`PolicyModel.forward(keep=)`). Built
    from the host masks, so the index's size needs no device read."""
    parts = []
    for r, i in enumerate(idx):
        m = masks[i].narrow(0, 1, max(0, min(L, masks[i].shape[0]) - 1))
        parts.append(torch.nonzero(m > 0).squeeze(1) + r * (L - 1))
    return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.long, device=device)


def shared_layout(rows: list, idx: list[int], keep: torch.Tensor | None, L: int, fmt, d: Dist,
                  device: torch.device | str) -> SharedPrefix | None:
    """The two-stage layout of micro-batch `idx` (`policy.shared_prefix`) when it saves more tokens
    than a micro-batch's overhead, else None. `keep`: host kept positions (None or empty: the full
    head runs, no sharing). Under FSDP every rank takes the same path (the two stages are two
    passes through every sharded unit), so a micro-batch is shared only if every rank's is: one
    scalar collective, called by every rank for every micro-batch."""
    sp = None
    if keep is not None and keep.numel():
        sp = shared_prefix([rows[i] for i in idx], keep, L, fmt.pad, stop_ids=fmt.vision_ids, device=device,
                           min_saved=DEFAULT_OVERHEAD_TOKENS)
    if d.enabled and all_reduce_max(int(sp is None), d):
        return None
    return sp


def supervised_mask(masks: list[list[int]], idx: list[int], real: bool, L: int, *, dtype: torch.dtype,
                    device: torch.device | str) -> torch.Tensor:
    """[rows, L-1] next-token target mask of an SFT/pre-training micro-batch (mask[j] = 1: token j
    is a target), x0 for a dummy micro-batch, built on `device` from the host lists in one copy."""
    rows = [list(masks[i][1:L]) + [0] * (L - 1 - len(masks[i][1:L])) for i in idx]
    return torch.tensor(rows, dtype=dtype, device=device) * float(real)


def supervised_loss(logp: torch.Tensor, mask: torch.Tensor, g_tok: float) -> torch.Tensor:
    """Masked next-token NLL summed over the micro-batch, divided by the global target count."""
    return -(logp * mask).sum() / max(1.0, g_tok)


def supervised_update(policy: PolicyModel, optimizer, rows: list, masks: list[list[int]], *, fmt, d: Dist,
                      budget: int, grad_clip: float) -> tuple[float, float, bool, float]:
    """One optimiser step on the masked next-token NLL of this rank's `rows` (SFT demonstrations,
    pre-training sequences; mask[j] = 1: token j is a target). The mean is over the masked tokens
    of all ranks, so the step does not depend on how rows are split over ranks and micro-batches.
    Returns (global loss, gradient norm, skipped, global target count)."""
    g_tok = all_reduce_sum(sum(sum(m[1:]) for m in masks), d)
    optimizer.zero_grad(set_to_none=True)
    device = policy_device(policy)
    total = 0.0
    for mb, real in even_batches(micro_batches([len(r) for r in rows], budget), d):
        batch = pack([rows[i] for i in mb], fmt.pad, fmt.image_pad, mb, device=device)
        L = batch.input_ids.shape[1]
        # The head at the target tokens only, and a shared system turn forwarded once (a dummy
        # micro-batch runs the full head, so its zero loss reaches every parameter).
        keep = kept_positions({i: torch.tensor(masks[i]) for i in mb}, mb, L, "cpu") if real else None
        shared = shared_layout(rows, mb, keep, L, fmt, d, device)
        keep = keep.to(device) if keep is not None and keep.numel() else None
        logp, _ = policy(batch, return_entropy=False, keep=keep, shared=shared)
        mask = supervised_mask(masks, mb, real, L, dtype=logp.dtype, device=logp.device)
        loss = supervised_loss(logp, mask, g_tok)
        (loss * d.world).backward()   # FSDP averages gradients over ranks
        total += float(loss.detach())
    loss_all, norm, skipped = optimizer_step(policy, optimizer, total, grad_clip, d)
    return loss_all, norm, skipped, g_tok


@torch.no_grad()
def old_logprobs(policy: PolicyModel, rows: list[dict], fmt, budget: int, temperature: float, d: Dist
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    logps: list = [None] * len(rows)
    ents: list = [None] * len(rows)
    for idx, real in even_batches(micro_batches([len(r["tokens"]) for r in rows], budget), d):
        batch = pack([rows[i] for i in idx], fmt.pad, fmt.image_pad, idx, device=policy_device(policy))
        lp, en = policy(batch, temperature=temperature, return_entropy=True)
        if not real:
            continue
        for r, i in enumerate(idx):
            n = len(rows[i]["tokens"]) - 1
            # index j-1 holds token j's log-prob; prepend a 0 so index j is token j.
            logps[i] = torch.cat([lp.new_zeros(1), lp[r, :n].float()])
            ents[i] = torch.cat([en.new_zeros(1), en[r, :n].float()])
    return logps, ents


def _deterministic(policy) -> bool:
    """The policy's forward is a function of its weights and inputs only: no dropout active (a
    training-mode dropout would make a second forward's log-probs differ from the first's)."""
    for m in policy.modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
        p = getattr(m, "attention_dropout", 0.0)   # Hugging Face attention modules: a float
        if isinstance(p, float) and p > 0:
            return False
    return True


def policy_update(policy: PolicyModel, optimizer, trajs, token_adv: list[torch.Tensor],
                  masks: list[torch.Tensor], *, fmt, d: Dist, budget: int, temperature: float,
                  clip_low: float, clip_high: float, beta: float, agg: str, epochs: int,
                  grad_clip: float, ref_policy: PolicyModel | None = None,
                  old_pass: bool | None = None) -> dict:
    """`ref_policy` (frozen) is needed when beta > 0: the k3 KL to it is added to the loss.

    `old_pass`: run the separate old-log-prob forward. None (default): only when it can change
    the step, i.e. with more than one epoch (or an active dropout); with one epoch the update's
    forward runs on the weights the old log-probs would come from, so they are its own detached
    log-probs (ratio exactly 1, TRL skips the pass alike) and the entropies for logging come from
    that forward. True forces the pass (the reference the skip is tested against)."""
    if beta > 0 and ref_policy is None:
        raise ValueError("algo.beta > 0 needs a reference policy")
    if old_pass is None:
        old_pass = epochs != 1 or not _deterministic(policy)
    rows = _rows(trajs)
    old = ents = None
    if old_pass:
        old, ents = old_logprobs(policy, rows, fmt, budget, temperature, d)
    ref_logps = None
    if beta > 0:
        ref_logps = old_logprobs(ref_policy, rows, fmt, budget, temperature, d)[0]
        if hasattr(ref_policy, "reshard"):   # FSDP2: free the reference's gathered root weights
            ref_policy.reshard()
    n_tokens = [float(m[1:].sum()) for m in masks]   # host counts (a token 0 is never trained)
    n_tok = sum(float(m.sum()) for m in masks)
    n_seq = sum(1.0 for m in masks if m.sum() > 0)
    g_tok = all_reduce_sum(n_tok, d)
    g_seq = all_reduce_sum(n_seq, d)
    device = policy_device(policy)
    host_masks = masks                              # for the trained positions' indices (host sizes)
    masks = [m.to(device) for m in masks]           # once per step, not per micro-batch and epoch
    token_adv = [a.to(device) for a in token_adv]
    ent_sums = [torch.stack([(e * m).sum() for e, m in zip(ents, masks)]).sum()] if ents else []
    stats = {"loss": 0.0, "clip_frac": 0.0, "ratio": 0.0, "kl": 0.0, "grad_norm": 0.0,
             "entropy": 0.0, "trained_tokens": g_tok, "skipped": 0.0}
    if g_tok == 0:
        stats["entropy"] = all_reduce_sum(float(sum(ent_sums)) if ent_sums else 0.0, d) / max(1.0, g_tok)
        return stats
    batches = even_batches(micro_batches([len(r["tokens"]) for r in rows], budget), d)
    # Per micro-batch, once for all epochs: the head only where the loss reads (trained tokens; a
    # dummy or all-masked batch runs it everywhere, so its zero loss still reaches every
    # parameter) and each group's shared prefix (decided by every rank, even with no keep).
    layouts = []
    for idx, real in batches:
        L = max(len(rows[i]["tokens"]) for i in idx)   # pack's padded length
        keep = kept_positions(host_masks, idx, L, "cpu") if real and sum(n_tokens[i] for i in idx) else None
        shared = shared_layout(rows, idx, keep, L, fmt, d, device)
        layouts.append((keep.to(device) if keep is not None else None, shared))
    for epoch in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for (idx, real), (keep, shared) in zip(batches, layouts):
            batch = pack([rows[i] for i in idx], fmt.pad, fmt.image_pad, idx, device=device)
            inp = micro_batch_inputs(idx, real, batch.input_ids.shape[1], masks=masks, old=old,
                                     token_adv=token_adv, ref_logps=ref_logps, n_tokens=n_tokens, device=device)
            want_ent = not old_pass and epoch == 0
            logp, ent = policy(batch, temperature=temperature, return_entropy=want_ent, keep=keep, shared=shared)
            if want_ent:
                ent_sums.append((ent.detach().float() * inp.mask).sum())   # x0 for a dummy batch
            if inp.n_local == 0.0:
                # A dummy or all-masked micro-batch: a zero loss still connected to every parameter
                # keeps FSDP's gradient collectives in step.
                (logp * 0.0).sum().backward()
                continue
            # The global denominator makes the sum over micro-batches and ranks the step's mean.
            loss, st = micro_batch_loss(logp, inp, clip_low=clip_low, clip_high=clip_high, beta=beta, agg=agg,
                                        normalizer=g_tok if agg == "token-mean" else g_seq)
            (loss * d.world).backward()   # FSDP averages gradients over ranks; undo that
            total += float(loss.detach())
            w = inp.n_local / g_tok
            stats["clip_frac"] += float(st["clip_frac"]) * w / epochs
            stats["ratio"] += float(st["ratio_mean"]) * w / epochs
            stats["kl"] += float(st.get("kl_mean", 0.0)) * w / epochs
        loss_all, norm, skipped = optimizer_step(policy, optimizer, total, grad_clip, d)
        stats["skipped"] += float(skipped)
        stats["loss"] += loss_all / epochs
        stats["grad_norm"] += norm / epochs
    ent_sum = float(torch.stack(ent_sums).sum()) if ent_sums else 0.0    # one host read
    stats["entropy"] = all_reduce_sum(ent_sum, d) / max(1.0, g_tok)
    for k in ("clip_frac", "ratio", "kl"):  # local token-share-weighted means: their sum is global
        stats[k] = all_reduce_sum(stats[k], d)
    return stats
