"""Group advantages and the clipped policy loss (PPO / GRPO / Dr. GRPO), separate and fused.

Layers: Triton kernels (`_segment_stats_kernel`, `_group_adv_kernel`, `_policy_loss_kernel`)
and a vectorised PyTorch path with the same math; host functions choosing the backend; two
torch.library custom ops with fake implementations, `axpo::group_advantages` (static shapes: S
samples get S segment slots, see `dense_segments`) and `axpo::policy_loss`, whose registered
autograd attaches the closed-form d(loss)/d(logp) computed in the forward; the documented public
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

from .dispatch import HAS_TRITON, backend_for, check_same_device, contiguous, triton_fn

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
        mean = tl.sum(acc, 0) / tl.maximum(n, 1.0)  # an unused slot (cnt == 0) gets 0, not 0/0
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
# Static shapes: S samples have at most S segments, so every per-segment array has S slots, of
# which the first G (the number of distinct ids) are used, in sorted-id order (the order
# torch.unique would give); the rest have count 0, mean 0, std 0, scale 0. No op depends on G,
# so the whole computation traces under FakeTensorMode / torch.compile (torch.unique cannot: its
# output size depends on the data).


def dense_segments(group_ids, subgroup_ids=None):
    """(seg, order): dense segment index 0..G-1 of every sample, in sorted order of the ids (or of
    the (group, subgroup) pairs, lexicographically), and the stable sort permutation."""
    # Tensor ops only, no Python indexing (see dispatch.contiguous on why).
    g = group_ids.reshape(-1).long()
    S = g.shape[0]

    def changes(x):  # x[i] != x[i - 1] for i >= 1
        return torch.ne(x.narrow(0, 1, max(S - 1, 0)), x.narrow(0, 0, max(S - 1, 0)))

    if subgroup_ids is None:
        order = torch.argsort(g, stable=True)
        brk = changes(torch.index_select(g, 0, order))
    else:
        sub = subgroup_ids.reshape(-1).long()
        o1 = torch.argsort(sub, stable=True)
        order = torch.index_select(o1, 0, torch.argsort(torch.index_select(g, 0, o1), stable=True))
        brk = changes(torch.index_select(g, 0, order)) | changes(torch.index_select(sub, 0, order))
    # segment index of the i-th sorted sample: the number of id changes before it
    new = torch.cat([torch.ones(min(S, 1), device=g.device, dtype=torch.long), brk.long()])
    seg_sorted = torch.cumsum(new, 0) - 1
    seg = torch.empty_like(seg_sorted).scatter_(0, order, seg_sorted)
    return seg, order


def _stats_dtype(rewards, backend):
    return torch.float32 if backend == "triton" else torch.promote_types(rewards.dtype, torch.float32)


def _segment_stats(rewards, seg, order, grpo, eps, backend):
    """Per-slot (mean, std, scale, count), S slots, so that advantage = (r - mean[seg]) * scale[seg]."""
    S = rewards.numel()
    counts = torch.zeros(S, device=rewards.device, dtype=torch.long).index_add_(0, seg, torch.ones_like(seg))
    if backend == "triton":
        dev = rewards.device
        mean = torch.empty(S, device=dev, dtype=torch.float32)
        std = torch.empty_like(mean)
        scale = torch.empty_like(mean)
        starts = torch.cumsum(counts, 0) - counts
        if S:
            triton_fn(_segment_stats_kernel, dev)[(S,)](
                rewards, order, starts, counts, mean, std, scale, float(eps), GRPO=grpo, BLOCK=SEG_BLOCK,
            )
        return mean, std, scale, counts
    r = rewards.to(_stats_dtype(rewards, backend))
    n = counts.to(r.dtype)
    mean = torch.zeros(S, device=r.device, dtype=r.dtype).index_add_(0, seg, r) / n.clamp(min=1)
    dev_ = r - mean[seg]
    var = torch.zeros_like(mean).index_add_(0, seg, dev_ * dev_) / (n - 1).clamp(min=1)
    std = var.sqrt()
    one = torch.ones_like(std)
    scale = 1.0 / (std + eps) if grpo else one
    scale = torch.where(counts > 1, scale, torch.zeros_like(scale))
    return mean, std, scale, counts


def _advantages_from_stats(rewards, seg, mean, scale, backend):
    if backend == "triton":
        S = rewards.numel()
        out = torch.empty(S, device=rewards.device, dtype=torch.float32)
        if S:
            triton_fn(_group_adv_kernel, rewards.device)[(triton.cdiv(S, 1024),)](
                rewards, seg, mean, scale, out, S, BLOCK=1024
            )
        return out
    return (rewards.to(mean.dtype) - mean[seg]) * scale[seg]


@torch.library.custom_op("axpo::group_advantages", mutates_args=())
def group_advantages_op(
    rewards: torch.Tensor, seg: torch.Tensor, order: torch.Tensor, grpo: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(adv [S], mean [S], std [S], scale [S], count [S]) from flat rewards and dense segments."""
    backend = backend_for(rewards)
    r = rewards.contiguous() if backend == "triton" else rewards
    mean, std, scale, counts = _segment_stats(r, seg, order, grpo, eps, backend)
    adv = _advantages_from_stats(r, seg, mean, scale, backend)
    return adv, mean, std, scale, counts


@group_advantages_op.register_fake
def _(rewards, seg, order, grpo, eps):
    S = rewards.shape[0]
    dt = _stats_dtype(rewards, backend_for(rewards))
    f = lambda: rewards.new_empty(S, dtype=dt)  # noqa: E731
    return f(), f(), f(), f(), rewards.new_empty(S, dtype=torch.long)


def _group_advantages(rewards, group_ids, subgroup_ids, mode, eps, op):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    r = rewards.reshape(-1)
    if group_ids.numel() != r.numel() or (subgroup_ids is not None and subgroup_ids.numel() != r.numel()):
        raise ValueError("rewards, group_ids and subgroup_ids must have the same number of elements")
    check_same_device(op, rewards=rewards, group_ids=group_ids, subgroup_ids=subgroup_ids)
    seg, order = dense_segments(group_ids, subgroup_ids)
    adv, mean, std, scale, counts = group_advantages_op(r, seg, order, mode == "grpo", float(eps))
    return r, seg, adv, mean, std, scale, counts


def group_advantages(
    rewards, group_ids, *, subgroup_ids=None, mode="grpo", eps=1e-6, return_group_stats=False, num_segments=None
):
    """Group-relative advantages.

    `grpo`: `(r - mean_g) / (std_g + eps)` with the unbiased (Bessel) std; `dr_grpo`: `r - mean_g`.
    A group of one gets 0. Group ids are arbitrary integers (any order, not contiguous); with
    `subgroup_ids` the statistics are per (group, subgroup) pair.

    Returns `adv` `[S]` (fp32; fp64 for fp64 rewards on the PyTorch path). With
    `return_group_stats=True` also a dict with per-segment `mean`, `std`, `count`, `zero_std`
    (the flag for groups whose rewards are all equal, which carry no learning signal) and
    `segment` (each sample's dense segment index), segments in sorted order of the ids.
    The per-segment arrays have `num_segments` entries: pass the number of distinct ids (or
    (group, subgroup) pairs) when it is known, e.g. under torch.compile or FakeTensorMode; left
    None it is read from the data (one host sync, eager only). The advantages themselves never
    need it: their computation has static shapes.
    """
    r, seg, adv, mean, std, scale, counts = _group_advantages(
        rewards, group_ids, subgroup_ids, mode, eps, "group_advantages"
    )
    adv = adv.view(rewards.shape)
    if not return_group_stats:
        return adv
    G = num_segments
    if G is None:
        try:
            G = int(seg.max()) + 1 if seg.numel() else 0  # data-dependent: a host sync, eager only
        except Exception as e:
            raise RuntimeError(
                "group_advantages(return_group_stats=True) reads the number of segments from the data; "
                "pass num_segments= when tracing (torch.compile, FakeTensorMode)"
            ) from e
    G = int(G)

    def first(t):
        return t.narrow(0, 0, G)

    return adv, {"mean": first(mean), "std": first(std), "count": first(counts),
                 "zero_std": first((std == 0) & (counts > 1)), "segment": seg}


# -------------------------------------------------------------------------------------------------
# Loss core (no autograd): per-token loss, d(loss)/d(logp) and partial sums
# -------------------------------------------------------------------------------------------------


def _row_scale(mask2, agg, normalizer):
    """[R] factor applied to every token of a row, from the aggregation and the normaliser."""
    m = mask2.to(torch.float32)
    given = None if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=m.device)
    if agg == "token-mean":
        denom = m.sum().clamp(min=1.0) if given is None else given
        return contiguous((1.0 / denom).reshape(1).expand(m.shape[0]))
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


@torch.library.custom_op("axpo::policy_loss", mutates_args=())
def policy_loss_op(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor | None,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    row_scale: torch.Tensor,
    clip_low: float,
    clip_high: float,
    beta: float,
    rewards: torch.Tensor | None,
    seg: torch.Tensor | None,
    seg_mean: torch.Tensor | None,
    seg_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts [5]: sums of (loss, clipped, ratio, kl, mask), dlogp [R, T]) for [R, T] inputs.

    Advantages are `adv` ([R] or [R, T]) or, fused, formed from `rewards` [R] and the segment
    statistics. Differentiable in `logp` through parts[0] (the loss) only.
    """
    fused = (rewards, seg, seg_mean, seg_scale) if rewards is not None else None
    lp = logp.detach()
    if backend_for(logp) == "triton":
        dlogp, parts = _loss_triton(lp, old_logp, adv, mask, ref_logp, row_scale, clip_low, clip_high, beta, fused)
    else:
        if fused is not None:  # PyTorch path: the advantages are formed here, then the same math
            adv = (rewards.to(seg_mean.dtype) - seg_mean[seg]) * seg_scale[seg]
        dlogp, parts = _loss_torch(lp, old_logp, adv, mask, ref_logp, row_scale, clip_low, clip_high, beta)
    return parts, dlogp


def _loss_dtype(logp):
    return torch.float32 if backend_for(logp) == "triton" else torch.promote_types(logp.dtype, torch.float32)


@policy_loss_op.register_fake
def _(logp, old_logp, adv, mask, ref_logp, row_scale, clip_low, clip_high, beta, rewards, seg, seg_mean, seg_scale):
    dt = _loss_dtype(logp)
    return logp.new_empty(N_PARTIALS, dtype=dt), logp.new_empty(logp.shape, dtype=dt)


def _loss_setup_context(ctx, inputs, output):
    _, dlogp = output
    ctx.save_for_backward(dlogp)
    ctx.lp_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(dlogp)
    ctx.set_materialize_grads(False)


def _loss_backward(ctx, g_parts, _g_dlogp):
    if g_parts is None or not ctx.needs_input_grad[0]:
        return (None,) * 13
    (dlogp,) = ctx.saved_tensors
    return ((g_parts.select(0, 0) * dlogp).to(ctx.lp_dtype),) + (None,) * 12


torch.library.register_autograd("axpo::policy_loss", _loss_backward, setup_context=_loss_setup_context)


def _policy_loss(logp, old_logp, mask, adv, ref_logp, clip_low, clip_high, beta, agg, normalizer, fused=None,
                 op="clipped_policy_loss"):
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError("logp, old_logp and mask must have the same shape")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError("ref_logp must have the shape of logp")
    if logp.dim() == 0:
        raise ValueError("logp must have at least one dimension (tokens)")
    check_same_device(op, logp=logp, old_logp=old_logp, mask=mask, advantages=adv, ref_logp=ref_logp)
    T = logp.shape[-1]
    lp2 = logp.reshape(-1, T)
    R = lp2.shape[0]
    old2, mask2 = old_logp.reshape(R, T), mask.reshape(R, T)
    ref2 = ref_logp.reshape(R, T) if ref_logp is not None else None
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
    rew, seg, mean, scale = fused if fused is not None else (None,) * 4
    parts, _ = policy_loss_op(lp2, old2, adv2, mask2, ref2, row_scale, float(clip_low), float(clip_high),
                              float(beta), rew, seg, mean, scale)
    loss = parts.select(0, 0)
    p = parts.detach()
    n_tok = p.select(0, 4).clamp(min=1.0)
    stats = {"clip_frac": p.select(0, 1) / n_tok, "ratio_mean": p.select(0, 2) / n_tok,
             "kl_mean": p.select(0, 3) / n_tok}
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
    check_same_device("grouped_policy_loss", logp=logp, rewards=rewards, group_ids=group_ids,
                      subgroup_ids=subgroup_ids)
    r_in, seg, adv, mean, std, scale, counts = _group_advantages(
        r, group_ids, subgroup_ids, mode, eps, "grouped_policy_loss"
    )
    loss, stats = _policy_loss(
        logp, old_logp, mask, None, ref_logp, clip_low, clip_high, beta, agg, normalizer,
        fused=(r_in, seg, mean, scale), op="grouped_policy_loss",
    )
    stats["advantages"] = adv
    multi = counts > 1
    stats["zero_std_frac"] = ((std == 0) & multi).sum().float() / multi.sum().clamp(min=1).float()
    return loss, stats
