"""Group advantages and the clipped policy loss (PPO / GRPO / Dr. GRPO), separate and fused.

Layers: Triton kernels (`_segment_stats_kernel`, `_group_adv_kernel`, `_policy_loss_kernel`)
and a vectorised PyTorch path with the same math; host functions choosing the backend; a small
`autograd.Function` that attaches the closed-form d(loss)/d(logp); the documented public
functions. References: `reference.group_advantages_ref`, `reference.clipped_policy_loss_ref`.

Reductions are left visible: the loss kernel writes per-block partial sums (loss, clipped, ratio,
KL, mask) that the host sums with `torch.sum` (deterministic, no atomics), and the normaliser
(global token or sequence count) can be passed in, so no hidden all-reduce and no `.item()`.

Gradient of the per-token loss with respect to logp (ratio r = exp(logp - old), advantage A):
    -min(r A, clip(r) A)   ->  -r A where the unclipped branch is the minimum, else 0;
    ties (r inside [1 - clip_low, 1 + clip_high], so both branches are equal) give -r A, as
    torch.minimum + torch.clamp do (the tie convention is tested);
    beta * k3 = beta * (e^(ref - logp) - (ref - logp) - 1)  ->  beta * (1 - e^(ref - logp)).
old_logp, advantages and ref_logp are constants of the step and get no gradient.
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, backend_for, triton_fn

if HAS_TRITON:
    import triton
    import triton.language as tl

_MODES = ("grpo", "dr_grpo")
_AGGS = ("token-mean", "seq-mean-token-mean")
SEG_BLOCK = 256
LOSS_BLOCK = 1024
# 8 warps (4 tokens per thread): 45-48 registers, no spills at sm_80/sm_90a. With 4 warps the
# per-token-advantage variant spilled 4 bytes at sm_80 (ptxas -v, tests/kernels/test_aot.py).
LOSS_NUM_WARPS = 8
N_PARTIALS = 5  # loss, clipped, ratio, kl, mask

if HAS_TRITON:

    @triton.jit
    def _segment_stats_kernel(
        r_ptr,  # rewards [S]
        order_ptr,  # int64 [S]: positions sorted by segment
        start_ptr,  # int64 [G]
        count_ptr,  # int64 [G]
        mean_ptr,  # fp32 [G]
        std_ptr,  # fp32 [G]
        scale_ptr,  # fp32 [G]: advantage = (r - mean) * scale
        eps,
        GRPO: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per (group, subgroup) segment; two passes (mean, then squared deviations)
        # rather than sum / sum of squares, which cancels badly for rewards with a large offset.
        g = tl.program_id(0)
        start = tl.load(start_ptr + g)
        cnt = tl.load(count_ptr + g)
        acc = tl.zeros([BLOCK], tl.float32)
        for off in range(0, cnt, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            msk = idx < cnt
            pos = tl.load(order_ptr + start + idx, mask=msk, other=0)
            acc += tl.load(r_ptr + pos, mask=msk, other=0.0).to(tl.float32)
        n = cnt.to(tl.float32)
        mean = tl.sum(acc, 0) / n
        acc2 = tl.zeros([BLOCK], tl.float32)
        for off in range(0, cnt, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            msk = idx < cnt
            pos = tl.load(order_ptr + start + idx, mask=msk, other=0)
            d = tl.where(msk, tl.load(r_ptr + pos, mask=msk, other=0.0).to(tl.float32) - mean, 0.0)
            acc2 += d * d
        var = tl.sum(acc2, 0) / tl.maximum(n - 1.0, 1.0)  # Bessel
        std = tl.sqrt(var)
        if GRPO:
            scale = tl.where(cnt > 1, 1.0 / (std + eps), 0.0)  # a group of one gets 0
        else:
            scale = tl.where(cnt > 1, 1.0, 0.0)
        tl.store(mean_ptr + g, mean)
        tl.store(std_ptr + g, std)
        tl.store(scale_ptr + g, scale)

    @triton.jit
    def _group_adv_kernel(r_ptr, seg_ptr, mean_ptr, scale_ptr, out_ptr, S, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        msk = offs < S
        seg = tl.load(seg_ptr + offs, mask=msk, other=0)
        r = tl.load(r_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        adv = (r - tl.load(mean_ptr + seg, mask=msk, other=0.0)) * tl.load(scale_ptr + seg, mask=msk, other=0.0)
        tl.store(out_ptr + offs, adv, mask=msk)

    @triton.jit
    def _policy_loss_kernel(
        logp_ptr,
        old_ptr,
        ref_ptr,
        adv_ptr,  # [R] per sequence or [n] per token (ADV_PER_TOKEN); unused if FUSED_ADV
        rew_ptr,  # FUSED_ADV: rewards [R], dense segment ids [R], per-segment mean and scale
        seg_ptr,
        mean_ptr,
        scale_ptr,
        mask_ptr,
        row_scale_ptr,  # [R]: 1 / normaliser for each row's tokens (token-mean or seq-mean)
        dlogp_ptr,  # fp32 [n]: d(loss)/d(logp)
        part_ptr,  # fp32 [num_blocks, 5]
        n,
        T,
        clip_low,
        clip_high,
        beta,
        ADV_PER_TOKEN: tl.constexpr,
        FUSED_ADV: tl.constexpr,
        HAS_REF: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        row = offs // T
        lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        if FUSED_ADV:
            seg = tl.load(seg_ptr + row, mask=inb, other=0)
            r = tl.load(rew_ptr + row, mask=inb, other=0.0).to(tl.float32)
            a = (r - tl.load(mean_ptr + seg, mask=inb, other=0.0)) * tl.load(scale_ptr + seg, mask=inb, other=0.0)
        elif ADV_PER_TOKEN:
            a = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        else:
            a = tl.load(adv_ptr + row, mask=inb, other=0.0).to(tl.float32)
        w = m * tl.load(row_scale_ptr + row, mask=inb, other=0.0)
        on = inb & (m != 0.0)

        ratio = tl.exp(lp - old)
        s1 = ratio * a
        s2 = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high) * a
        loss = -tl.minimum(s1, s2)
        dl = tl.where(s2 < s1, 0.0, -s1)
        clipped = ((ratio < 1.0 - clip_low) & (a < 0.0)) | ((ratio > 1.0 + clip_high) & (a > 0.0))
        if HAS_REF:
            d = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32) - lp
            ek = tl.exp(d)
            kl = ek - d - 1.0
            loss += beta * kl
            dl += beta * (1.0 - ek)
        else:
            kl = tl.zeros_like(lp)
        # where() rather than multiply: a masked token may hold garbage (inf ratio) and 0 * inf
        # would poison the sums.
        tl.store(dlogp_ptr + offs, tl.where(on, w * dl, 0.0), mask=inb)
        base = part_ptr + pid.to(tl.int64) * 5
        tl.store(base + 0, tl.sum(tl.where(on, w * loss, 0.0), 0))
        tl.store(base + 1, tl.sum(tl.where(on & clipped, m, 0.0), 0))
        tl.store(base + 2, tl.sum(tl.where(on, m * ratio, 0.0), 0))
        tl.store(base + 3, tl.sum(tl.where(on, m * kl, 0.0), 0))
        tl.store(base + 4, tl.sum(tl.where(inb, m, 0.0), 0))


# -------------------------------------------------------------------------------------------------
# Group statistics
# -------------------------------------------------------------------------------------------------


def _dense_segments(group_ids, subgroup_ids):
    """Map arbitrary integer ids (or (group, subgroup) pairs) to dense 0..G-1 on the host side.

    torch.unique synchronises, which is fine here: G sets the launch grid anyway.
    """
    if subgroup_ids is None:
        uniq, inv = torch.unique(group_ids.reshape(-1), return_inverse=True)
    else:
        keys = torch.stack([group_ids.reshape(-1).long(), subgroup_ids.reshape(-1).long()], 1)
        uniq, inv = torch.unique(keys, dim=0, return_inverse=True)
    return inv, uniq.shape[0]


def _segment_stats(rewards, inv, G, mode, eps, backend):
    """Per-segment (mean, std, scale, count) so that advantage = (r - mean[seg]) * scale[seg]."""
    counts = torch.bincount(inv, minlength=G)
    if backend == "triton":
        dev = rewards.device
        mean = torch.empty(G, device=dev, dtype=torch.float32)
        std = torch.empty_like(mean)
        scale = torch.empty_like(mean)
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        if G:
            triton_fn(_segment_stats_kernel, dev)[(G,)](
                rewards, order, starts, counts, mean, std, scale, float(eps),
                GRPO=mode == "grpo", BLOCK=SEG_BLOCK,
            )
        return mean, std, scale, counts
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    n = counts.to(r.dtype)
    mean = torch.zeros(G, device=r.device, dtype=r.dtype).index_add_(0, inv, r) / n
    dev_ = r - mean[inv]
    var = torch.zeros_like(mean).index_add_(0, inv, dev_ * dev_) / (n - 1).clamp(min=1)
    std = var.sqrt()
    one = torch.ones_like(std)
    scale = 1.0 / (std + eps) if mode == "grpo" else one
    scale = torch.where(counts > 1, scale, torch.zeros_like(scale))
    return mean, std, scale, counts


def _advantages_from_stats(rewards, inv, mean, scale, backend):
    if backend == "triton":
        S = rewards.numel()
        out = torch.empty(S, device=rewards.device, dtype=torch.float32)
        if S:
            triton_fn(_group_adv_kernel, rewards.device)[(triton.cdiv(S, 1024),)](
                rewards, inv, mean, scale, out, S, BLOCK=1024
            )
        return out
    return (rewards.to(mean.dtype) - mean[inv]) * scale[inv]


def group_advantages(rewards, group_ids, *, subgroup_ids=None, mode="grpo", eps=1e-6, return_group_stats=False):
    """Group-relative advantages.

    `grpo`: `(r - mean_g) / (std_g + eps)` with the unbiased (Bessel) std; `dr_grpo`: `r - mean_g`.
    A group of one gets 0. Group ids are arbitrary integers (any order, not contiguous); with
    `subgroup_ids` the statistics are per (group, subgroup) pair.

    Returns `adv` `[S]` (fp32; fp64 for fp64 rewards on the PyTorch path). With
    `return_group_stats=True` also a dict with per-segment `mean`, `std`, `count`, `zero_std`
    (the flag for groups whose rewards are all equal, which carry no learning signal) and
    `segment` (each sample's dense segment index).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    r = rewards.reshape(-1)
    if group_ids.numel() != r.numel() or (subgroup_ids is not None and subgroup_ids.numel() != r.numel()):
        raise ValueError("rewards, group_ids and subgroup_ids must have the same number of elements")
    backend = backend_for(r)
    inv, G = _dense_segments(group_ids, subgroup_ids)
    r_in = r.contiguous() if backend == "triton" else r
    mean, std, scale, counts = _segment_stats(r_in, inv, G, mode, eps, backend)
    adv = _advantages_from_stats(r_in, inv, mean, scale, backend).view(rewards.shape)
    if not return_group_stats:
        return adv
    return adv, {"mean": mean, "std": std, "count": counts, "zero_std": (std == 0) & (counts > 1), "segment": inv}


# -------------------------------------------------------------------------------------------------
# Loss core (no autograd): per-token loss, d(loss)/d(logp) and partial sums
# -------------------------------------------------------------------------------------------------


def _row_scale(mask2, agg, normalizer):
    """[R] factor applied to every token of a row, from the aggregation and the normaliser."""
    m = mask2.to(torch.float32)
    given = None if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=m.device)
    if agg == "token-mean":
        denom = m.sum().clamp(min=1.0) if given is None else given
        return (1.0 / denom).reshape(1).expand(m.shape[0]).contiguous()
    per_row = m.sum(-1).clamp(min=1.0)
    nseq = float(m.shape[0]) if given is None else given
    return 1.0 / (per_row * nseq)


def _loss_torch(lp, old, adv, mask, ref, row_scale, clip_low, clip_high, beta):
    """The kernel's math in PyTorch ops on [R, T] tensors; returns (dlogp, partial sums [5])."""
    dt = torch.promote_types(lp.dtype, torch.float32)
    lp = lp.to(dt)
    ratio = torch.exp(lp - old.to(dt))
    a = adv.to(dt)
    a = a if a.dim() == 2 else a.unsqueeze(1)
    m = mask.to(dt)
    on = m != 0
    w = m * row_scale.to(dt).unsqueeze(1)
    s1 = ratio * a
    s2 = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * a
    loss = -torch.minimum(s1, s2)
    dl = torch.where(s2 < s1, torch.zeros_like(s1), -s1)
    clipped = ((ratio < 1.0 - clip_low) & (a < 0)) | ((ratio > 1.0 + clip_high) & (a > 0))
    if ref is not None:
        d = ref.to(dt) - lp
        ek = torch.exp(d)
        kl = ek - d - 1.0
        loss = loss + beta * kl
        dl = dl + beta * (1.0 - ek)
    else:
        kl = torch.zeros_like(lp)
    zero = torch.zeros((), dtype=dt, device=lp.device)
    dlogp = torch.where(on, w * dl, zero)
    parts = torch.stack(
        [
            torch.where(on, w * loss, zero).sum(),
            torch.where(on & clipped, m, zero).sum(),
            torch.where(on, m * ratio, zero).sum(),
            torch.where(on, m * kl, zero).sum(),
            m.sum(),
        ]
    )
    return dlogp, parts


def _loss_triton(lp, old, adv, mask, ref, row_scale, clip_low, clip_high, beta, fused=None):
    R, T = lp.shape
    n = R * T
    dev = lp.device
    nblk = max(1, triton.cdiv(n, LOSS_BLOCK))
    dlogp = torch.empty(R, T, device=dev, dtype=torch.float32)
    parts = torch.zeros(nblk, N_PARTIALS, device=dev, dtype=torch.float32)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731 - kernels index flat
    lp, old, mask, ref = c(lp), c(old), c(mask), c(ref)
    if mask.dtype == torch.bool:
        mask = mask.to(torch.uint8)
    dummy = lp
    if fused is not None:
        rew, seg, mean, scale = (c(t) for t in fused)
        adv_ptr, per_token = dummy, False
    else:
        rew = seg = mean = scale = dummy
        adv_ptr, per_token = c(adv), adv.dim() == 2
    if n:
        triton_fn(_policy_loss_kernel, dev)[(nblk,)](
            lp, old, ref if ref is not None else dummy, adv_ptr, rew, seg, mean, scale, mask,
            row_scale, dlogp, parts, n, T, float(clip_low), float(clip_high), float(beta),
            ADV_PER_TOKEN=per_token, FUSED_ADV=fused is not None, HAS_REF=ref is not None,
            BLOCK=LOSS_BLOCK, num_warps=LOSS_NUM_WARPS,
        )
    return dlogp, parts.sum(0)


class _AttachGrad(torch.autograd.Function):
    """loss (computed without autograd) with backward g * dloss/dlogp, precomputed in the kernel."""

    @staticmethod
    def forward(ctx, logp, loss, dlogp):
        ctx.save_for_backward(dlogp)
        ctx.dtype = logp.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        (dlogp,) = ctx.saved_tensors
        return (g * dlogp).to(ctx.dtype), None, None


def _policy_loss(logp, old_logp, mask, adv, ref_logp, clip_low, clip_high, beta, agg, normalizer, fused=None):
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError("logp, old_logp and mask must have the same shape")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError("ref_logp must have the shape of logp")
    if logp.dim() == 0:
        raise ValueError("logp must have at least one dimension (tokens)")
    T = logp.shape[-1]
    lp2 = logp.reshape(-1, T)
    R = lp2.shape[0]
    old2, mask2 = old_logp.reshape(R, T), mask.reshape(R, T)
    ref2 = ref_logp.reshape(R, T) if ref_logp is not None else None
    backend = backend_for(logp)
    row_scale = _row_scale(mask2, agg, normalizer)
    if adv is not None:
        if adv.shape == logp.shape:
            adv2 = adv.reshape(R, T)
        elif adv.shape == logp.shape[:-1]:
            adv2 = adv.reshape(R)
        else:
            raise ValueError(
                f"advantages must be per sequence {tuple(logp.shape[:-1])} or per token {tuple(logp.shape)}"
            )
    else:
        adv2 = None
    with torch.no_grad():
        if backend == "triton":
            dlogp, parts = _loss_triton(
                lp2.detach(), old2, adv2, mask2, ref2, row_scale, clip_low, clip_high, beta, fused
            )
        else:
            if fused is not None:  # PyTorch path: the advantages are formed here, then the same math
                rew, seg, mean, scale = fused
                adv2 = (rew.to(mean.dtype) - mean[seg]) * scale[seg]
            dlogp, parts = _loss_torch(lp2.detach(), old2, adv2, mask2, ref2, row_scale, clip_low, clip_high, beta)
    n_tok = parts[4].clamp(min=1.0)
    stats = {
        "clip_frac": parts[1] / n_tok,
        "ratio_mean": parts[2] / n_tok,
        "kl_mean": parts[3] / n_tok,
    }
    loss = parts[0]
    if torch.is_grad_enabled() and logp.requires_grad:
        loss = _AttachGrad.apply(logp, loss, dlogp.view(logp.shape))
    return loss, stats


def clipped_policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    ref_logp=None,
    beta=0.0,
    agg="token-mean",
    normalizer=None,
):
    """PPO-style clipped surrogate with an optional k3 KL penalty; returns `(loss, stats)`.

    Per token: `-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta * k3(ref_logp, logp)`
    with `r = exp(logp - old_logp)`.

    Args:
        logp: `[..., T]` current log-probs (the only differentiable input).
        old_logp, mask: same shape; mask is 0/1 (bool or float; float values act as weights).
        advantages: per sequence (`logp.shape[:-1]`) or per token (`logp.shape`).
        ref_logp, beta: k3 KL to the reference policy, added with weight `beta` (the mean KL is
            reported in stats whenever `ref_logp` is given).
        agg: `"token-mean"`: sum over masked tokens / number of masked tokens;
            `"seq-mean-token-mean"`: mean over sequences of each sequence's token mean (a
            sequence without masked tokens contributes 0 but still counts, as in TRL's "grpo").
        normalizer: the global denominator for the chosen `agg` (masked-token count, or number of
            sequences), e.g. summed over micro-batches and ranks by the caller; defaults to the
            local count. A number or a tensor; never read back to the host.

    Returns:
        `loss` (0-dim fp32), `stats` dict of 0-dim tensors: `clip_frac` (fraction of masked tokens
        whose clipped branch is active), `ratio_mean`, `kl_mean`; local token means.
    """
    return _policy_loss(logp, old_logp, mask, advantages, ref_logp, clip_low, clip_high, beta, agg, normalizer)


def grouped_policy_loss(
    logp,
    old_logp,
    mask,
    rewards,
    group_ids,
    *,
    subgroup_ids=None,
    mode="grpo",
    eps=1e-6,
    clip_low=0.2,
    clip_high=0.2,
    ref_logp=None,
    beta=0.0,
    agg="token-mean",
    normalizer=None,
):
    """`group_advantages` followed by `clipped_policy_loss`, fused.

    The segment statistics (per group or (group, subgroup): mean and 1 / (std + eps)) are one
    small kernel; the loss kernel then forms each sequence's advantage from its reward inside the
    kernel, so no per-token advantage tensor exists. `rewards` `[R]` has one entry per sequence
    (`R = prod(logp.shape[:-1])`). Stats add `advantages` `[R]` and `zero_std_frac` (fraction of
    groups of two or more whose rewards are all equal).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    R = logp.numel() // logp.shape[-1] if logp.dim() else 1
    r = rewards.reshape(-1)
    if r.numel() != R or group_ids.numel() != R:
        raise ValueError(f"rewards and group_ids need one entry per sequence ({R})")
    backend = backend_for(logp, rewards)
    inv, G = _dense_segments(group_ids, subgroup_ids)
    r_in = r.contiguous() if backend == "triton" else r
    mean, std, scale, counts = _segment_stats(r_in, inv, G, mode, eps, backend)
    loss, stats = _policy_loss(
        logp, old_logp, mask, None, ref_logp, clip_low, clip_high, beta, agg, normalizer,
        fused=(r_in, inv, mean, scale),
    )
    with torch.no_grad():
        stats["advantages"] = _advantages_from_stats(r_in, inv, mean, scale, backend)
        multi = counts > 1
        stats["zero_std_frac"] = ((std == 0) & multi).sum().float() / multi.sum().clamp(min=1).float()
    return loss, stats
