"""Fused LM head + clipped policy loss: the loss and its gradients in one pass over token chunks.

`linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, ...)` equals
`clipped_policy_loss(linear_logprob_entropy(hidden, weight, targets)[0], old_logp, advantages,
mask, ...)` (same options, same per-token semantics), but costs three GEMMs instead of four.

Why it is cheaper: the per-token gradient of the clipped loss with respect to logp depends only on
that token (its logp, old logp, advantage, mask, the normaliser that the mask fixes up front), so
it is known as soon as a chunk's log-probs are. Each chunk therefore does, in the forward:
    logits = X_c W^T (+ b)                      GEMM 1 (into a reused workspace)
    row stats, logp, entropy, loss, dloss/dlogp the epilogue, on the workspace
    dlogits (in place, or a row factor; below)  the epilogue, continued
    dX_c = dlogits W;  dW (+)= dlogits^T X_c    GEMMs 2 and 3
and the backward only scales the stored dX, dW, db by the upstream gradient of the loss (a
scalar; skipped on CPU when it is exactly 1). `linear_logprob_entropy` cannot do this: its
upstream gradients arrive only in the backward, so it recomputes the logits there (a fourth GEMM).
This is Liger's structure for its fused losses, with entropy, without a per-chunk `[V, H]`
temporary, and with dW accumulated in fp32 once (`mm_acc`).

Gradients are computed during the forward whenever an input requires grad (so a forward whose
loss is never backpropagated wastes them); the backward may run once (it scales in place).
Entropy is returned for logging (`stats["entropy"]`), detached: no entropy bonus.

CPU fp32 (the PyTorch path) has its own epilogue (`_torch_epilogue`): per row block in cache,
max, exp (kept in the workspace), sum and the entropy dot product, so exp runs once per logit for
forward and backward together. The workspace then never becomes dlogits: with a = -g / (s T) per
row (g = dloss/dlogp, s the row's sum of exponentials), dlogits = a (e - s 1[j = y]), so the
epilogue only writes e_y - s at each target (one element per row) and GEMMs 2 and 3 scale their
small [chunk, H] operands by a instead: dX_c = a (E' W), dW += E'^T (a X_c), db += E'^T a. That
saves a full multiply pass over the [chunk, V] workspace per chunk, and keeps the target term in
the buffer (unlike adding g W_y to dX and g X_c to dW afterwards, which for p_y ~ 1 would cancel
two large GEMM results). Other dtypes and the Triton backend chain the row ops of
logprob_entropy.py (`axpo::logprob_entropy_fwd`, the loss op, `axpo::logprob_entropy_bwd_inplace_`)
and form dlogits in place.
"""

from __future__ import annotations

import torch

from . import dispatch
from .dispatch import backend_for, check_same_device, contiguous
from .linear_logprob_entropy import check_head_args, chunk_tokens_for, logits_chunk, mm_acc
from .logprob_entropy import _SCRATCH_ELEMS, logprob_entropy_bwd_inplace_op, logprob_entropy_fwd_op
from .policy_loss import _AGGS, N_PARTIALS, _loss_torch, _row_scale, policy_loss_op

# Workspace for one logits chunk (the only [chunk, V] buffer: exponentials and dlogits, or what
# scales to dlogits, are written in place).
# CPU: the memory target is an incremental peak of at most 0.6x Liger's fused GRPO loss, whose
# peak is dW (fp32 [V, H]) plus ~0.7 GiB at N=4096, H=1024, V=151936; ours is dW plus this
# workspace plus ~20 MiB. Measured (benchmarks/bench_kernels.py, AMD EPYC, 1 thread, CPU clock):
# 160 MiB (276 tokens) gave 1.09x the 3-GEMM floor at a peak of 0.59x Liger's; 144 MiB (248 tokens)
# keeps a margin under 0.6x.
_DEFAULT_WORKSPACE_MIB = {"cpu": 144, "cuda": 1024}
# Rows per block of the CPU epilogue: a block's exponentials and a scratch copy stay in cache.
ROW_BLOCK_ELEMS = _SCRATCH_ELEMS


def _torch_epilogue(buf, tgt, old, adv, mask, ref, row_scale, inv_t, clip_low, clip_high, beta, want_ent, grad,
                    scratch, scale_out=None):
    """fp32 logits chunk `buf` [n, V] -> (logp [n], entropy [n] or None, parts [5]). The math of
    logprob_entropy.py relative to the row max (z' = z / T - m, e = exp(z'), s = sum e,
    t = sum e z'), then logp = z'_y - log s, H = log s - t / s, and
    dz = (g / T) (1[j = y] - e / s) = a (e - s 1[j = y]) with a = -g / (s T), g = dloss/dlogp.
    With `grad`, `buf` becomes e - s 1[j = y] and `scale_out` [n] receives a, so that
    dlogits = a[:, None] * buf (the caller scales the small [n, H] GEMM operands instead of `buf`);
    without `scale_out`, `buf` becomes dlogits in place. A row without gradient has a = 0, and its
    `buf` row is zeroed if it is not finite. `scratch` [rows, V] fp32: one row block
    (`epilogue_scratch`)."""
    n, V = buf.shape
    dev = buf.device
    f32 = dict(device=dev, dtype=torch.float32)
    tgt = tgt.long()
    valid = (tgt >= 0) & (tgt < V)
    tgt_c = torch.where(valid, tgt, torch.zeros_like(tgt)).unsqueeze(1)
    m = torch.empty(n, 1, **f32)
    zy = torch.gather(buf, 1, tgt_c)  # once per chunk; scaled like the row (same rounding)
    if inv_t != 1.0:
        zy.mul_(inv_t)
    s = torch.empty(n, **f32)
    t = torch.empty(n, **f32) if want_ent else None
    rows = scratch.shape[0]
    # At V=151936 a row block is one row, so each op here runs once per token (4096 times at
    # N=4096): as few ops as possible, with the row views made in one call per chunk (split).
    # torch.sum of the exponentials and of e * d (torch's cascade sum) keep logp and entropy within
    # ~1.5e-6 of fp64 at V=151936; one GEMV of [ones; d] with e is ~12% faster here but only as
    # accurate as PyTorch's own fp32 log_softmax (3.3e-5), so it is not used. e * d is formed in
    # the scratch (what linalg.vecdot computes, bit for bit, but vecdot allocates a [V] temporary
    # per call: ~0.25 s at N=4096). A logit of -inf (or one so far below the max that z - m
    # overflows) gives e = 0 and d = -inf, so e * d = NaN: nansum counts it as the 0 it is
    # (instead of clamping d, which was one more pass over the row); a NaN logit still makes s NaN.
    zs = buf.split(rows)
    ms = m.split(rows)
    ss = s.split(rows)
    ts = t.split(rows) if want_ent else ss
    ds = [scratch] * (len(zs) - 1) + [scratch[: zs[-1].shape[0]]] if zs else []
    for z, mr, sr, tr, d in zip(zs, ms, ss, ts, ds):
        if inv_t != 1.0:
            z.mul_(inv_t)
        torch.amax(z, 1, keepdim=True, out=mr)
        if want_ent:
            torch.sub(z, mr, out=d)
            torch.exp(d, out=z)  # the workspace now holds the exponentials
            torch.sum(z, 1, out=sr)
            torch.nansum(d.mul_(z), 1, out=tr)
        else:
            z.sub_(mr).exp_()
            torch.sum(z, 1, out=sr)
    log_s = torch.log(s)
    zero = torch.zeros((), **f32)
    logp = torch.where(valid, zy.squeeze(1) - m.squeeze(1) - log_s, zero)
    ent = torch.where(valid, log_s - t / s, zero) if want_ent else None
    dl, parts = _loss_torch(logp.unsqueeze(1), old.unsqueeze(1), adv.unsqueeze(1), mask.unsqueeze(1),
                            ref.unsqueeze(1) if ref is not None else None, row_scale, clip_low, clip_high, beta)
    if grad:
        gl = torch.where(valid, dl.squeeze(1).to(torch.float32) * inv_t, zero)  # dloss/dz_y = g / T
        none = gl == 0
        a = torch.where(none, zero, -gl / s)
        # The target term stays in the buffer: E'_y = e_y - s, so a E'_y = (g / T) (1 - p_y). For
        # p_y ~ 1 that is the small difference of e_y and the rounded s, as (g / T) (1 - e_y / s)
        # was, and the GEMMs only see small values. (Adding g W_y to dX_c and g X_c to rows y of
        # dW after the GEMMs instead cancels large results: measured 1.5-5x the error on such rows.)
        buf.scatter_add_(1, tgt_c, torch.where(none, zero, -s).unsqueeze(1))
        # A row without gradient whose logits were not finite (garbage behind a mask) would give
        # 0 * NaN: zero it explicitly. One host sync per chunk, on the PyTorch path only.
        bad = none & ~torch.isfinite(s)
        if bool(bad.any()):
            buf.index_fill_(0, bad.nonzero().squeeze(1), 0.0)
        if scale_out is None:
            buf.mul_(a.unsqueeze(1))
        else:
            scale_out.copy_(a)
    return logp, ent, parts


def epilogue_scratch(V, device):
    """The [rows, V] fp32 scratch of `_torch_epilogue`: one row block."""
    return torch.empty(max(1, ROW_BLOCK_ELEMS // max(V, 1)), V, device=device, dtype=torch.float32)


def _generic_epilogue(buf, tgt, old, adv, mask, ref, row_scale, inv_t, clip_low, clip_high, beta, want_ent, grad):
    """Any dtype, any backend: the row ops of logprob_entropy.py around the loss op."""
    lp, en, st = logprob_entropy_fwd_op(buf.unsqueeze(0), tgt, inv_t, want_ent)
    parts, dl = policy_loss_op(lp.unsqueeze(1), old.unsqueeze(1), adv.unsqueeze(1), mask.unsqueeze(1),
                               ref.unsqueeze(1) if ref is not None else None, row_scale, clip_low, clip_high,
                               beta, None, None, None, None)
    if grad:
        logprob_entropy_bwd_inplace_op(buf, tgt, st, dl.squeeze(1), None, inv_t)
    return lp, (en if want_ent else None), parts


def _forward(hidden, weight, bias, targets, old, adv, mask, ref, row_scale, inv_t, clip_low, clip_high, beta,
             want_ent, chunk, need_x, need_w, need_b):
    N, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    empty = dispatch.empty
    grad = need_x or need_w or need_b
    has_b = need_b and bias is not None
    n_chunks = -(-N // chunk) if N else 0
    logp = empty(N, device=dev, dtype=torch.float32)
    ent = empty(N if want_ent else 0, device=dev, dtype=torch.float32)
    parts = torch.zeros(N_PARTIALS, device=dev, dtype=torch.float32)
    dx = empty(N if need_x else 0, H, device=dev, dtype=dt)
    acc_dt = torch.float32 if n_chunks > 1 else weight.dtype
    dw = empty(V if need_w else 0, H, device=dev, dtype=acc_dt)
    if need_w and N == 0:
        dw.zero_()
    db = torch.zeros(V if has_b else 0, device=dev, dtype=torch.float32)
    ws = empty(min(chunk, max(N, 1)), V, device=dev, dtype=dt)
    fast = dt == torch.float32 and backend_for(hidden) == "torch"
    scratch = epilogue_scratch(V, dev) if fast else None
    # fast path: the epilogue leaves E' = e - s 1[j = y] in the workspace and the row factor `a`
    # (dlogits = a E'); a scales the [chunk, H] operands: dX_c = a (E' W), dW += E'^T (a X_c),
    # db += E'^T a. That saves a pass over the [chunk, V] workspace per chunk. a X_c is formed in
    # dX_c's rows (GEMM 3 runs before GEMM 2 overwrites them), so no extra memory.
    scale = empty(min(chunk, max(N, 1)) if fast and grad else 0, device=dev, dtype=torch.float32)
    xs_tmp = empty(min(chunk, max(N, 1)) if fast and need_w and not need_x else 0, H, device=dev, dtype=dt)
    for i, c0 in enumerate(range(0, N, chunk)):
        c1 = min(N, c0 + chunk)
        x = hidden[c0:c1]
        buf = logits_chunk(x, weight, bias, ws[: c1 - c0])
        args = (buf, targets[c0:c1], old[c0:c1], adv[c0:c1], mask[c0:c1], ref[c0:c1] if ref is not None else None,
                row_scale[c0:c1], inv_t, clip_low, clip_high, beta, want_ent, grad)
        a = scale[: c1 - c0] if scale.numel() else None
        if fast:
            lp, en, pc = _torch_epilogue(*args, scratch, scale_out=a)
        else:
            lp, en, pc = _generic_epilogue(*args)
        logp[c0:c1] = lp
        if want_ent:
            ent[c0:c1] = en
        parts.add_(pc.to(torch.float32))
        if not grad:
            continue
        if need_w:
            xs = x
            if a is not None:
                xs = torch.mul(x, a.unsqueeze(1), out=dx[c0:c1] if need_x else xs_tmp[: c1 - c0])
            mm_acc(dw, buf.t(), xs, first=i == 0)
        if need_x:
            torch.mm(buf, weight, out=dx[c0:c1])
            if a is not None:
                dx[c0:c1].mul_(a.unsqueeze(1))
        if has_b:
            if a is not None:
                db.addmv_(buf.t(), a)
            else:
                db.add_(buf.sum(0, dtype=torch.float32))
    if dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return parts, logp, ent, dx, dw, db.to(weight.dtype)


@torch.library.custom_op("axpo::linear_policy_loss_fwd", mutates_args=())
def linear_policy_loss_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    row_scale: torch.Tensor,
    inv_t: float,
    clip_low: float,
    clip_high: float,
    beta: float,
    want_ent: bool,
    chunk: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat per-token inputs ([N]; hidden [N, H]) -> (parts [5], logp [N], entropy [N] or [0],
    dhidden [N, H] or [0, H], dweight [V, H] or [0, H], dbias [V] or [0]), gradients of parts[0]."""
    return _forward(hidden, weight, bias, targets, old_logp, adv, mask, ref_logp, row_scale, inv_t, clip_low,
                    clip_high, beta, want_ent, chunk, need_x, need_w, need_b)


@linear_policy_loss_fwd_op.register_fake
def _(hidden, weight, bias, targets, old_logp, adv, mask, ref_logp, row_scale, inv_t, clip_low, clip_high, beta,
      want_ent, chunk, need_x, need_w, need_b):
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(N_PARTIALS, **f32), hidden.new_empty(N, **f32),
            hidden.new_empty(N if want_ent else 0, **f32), hidden.new_empty(N if need_x else 0, H),
            weight.new_empty(V if need_w else 0, H), weight.new_empty(V if need_b and bias is not None else 0))


@torch.library.custom_op("axpo::scale_grads_", mutates_args=("dx", "dw", "db"))
def scale_grads_op(dx: torch.Tensor, dw: torch.Tensor, db: torch.Tensor, g: torch.Tensor) -> None:
    """dx, dw, db *= g (0-dim), in place; on CPU skipped when g is exactly 1 (no [V, H] pass)."""
    if g.device.type == "cpu" and float(g) == 1.0:
        return
    for t in (dx, dw, db):
        if t.numel():
            t.mul_(g.to(t.dtype))


@scale_grads_op.register_fake
def _(dx, dw, db, g):
    return None


def _setup_context(ctx, inputs, output):
    _, logp, ent, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db)
    ctx.need = inputs[-3:]
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(logp, ent, dx, dw, db)
    ctx.set_materialize_grads(False)
    ctx.used = False


def _backward(ctx, g_parts, *_unused):
    none = (None,) * 18
    if g_parts is None:
        return none
    if ctx.used:
        raise RuntimeError("linear_policy_loss: its backward scales the stored gradients in place and can run once")
    ctx.used = True
    dx, dw, db = ctx.saved_tensors
    need_x, need_w, need_b = ctx.need
    scale_grads_op(dx, dw, db, g_parts.select(0, 0))
    want = ctx.needs_input_grad
    return ((dx if need_x and want[0] else None), (dw if need_w and want[1] else None),
            (db if need_b and ctx.has_bias and want[2] else None)) + (None,) * 15


torch.library.register_autograd("axpo::linear_policy_loss_fwd", _backward, setup_context=_setup_context)


def linear_policy_loss(
    hidden,
    weight,
    targets,
    old_logp,
    advantages,
    mask,
    *,
    bias=None,
    temperature=1.0,
    clip_low=0.2,
    clip_high=0.2,
    ref_logp=None,
    beta=0.0,
    agg="token-mean",
    normalizer=None,
    return_entropy=True,
    chunk_tokens=None,
):
    """`clipped_policy_loss(linear_logprob_entropy(hidden, weight, targets, bias=bias,
    temperature=temperature)[0], old_logp, advantages, mask, ...)` in one fused op: three GEMMs
    (the unfused head's count), no `[N, V]` tensor, gradients computed in the forward.

    Args:
        hidden: `[..., T, H]`; weight `[V, H]`; bias `[V]` or None (one float dtype).
        targets: `[..., T]` integer ids (outside `[0, V)`: logp 0, no gradient, as in
            `linear_logprob_entropy`); old_logp, mask (and ref_logp): `[..., T]`.
        advantages: per sequence `[...]` or per token `[..., T]`.
        clip_low, clip_high, ref_logp, beta, agg, normalizer: as in `clipped_policy_loss`.
        return_entropy: compute the entropy for logging (`stats["entropy"]`).
        chunk_tokens: tokens per chunk; default from a workspace budget (144 MiB on CPU, 1 GiB on
            CUDA; `AXPO_LM_HEAD_WORKSPACE_MB` overrides).

    Returns:
        `(loss, stats)`: `loss` 0-dim fp32, differentiable with respect to hidden, weight and
        bias; `stats` as `clipped_policy_loss` (`clip_frac`, `ratio_mean`, `kl_mean`) plus the
        detached fp32 `logp` and `entropy` (None without) of shape `[..., T]`.
    """
    check_head_args(hidden, weight, targets, bias, temperature, op="linear_policy_loss")
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")
    lead = targets.shape
    if len(lead) == 0:
        raise ValueError("targets must have at least one dimension (tokens)")
    if old_logp.shape != lead or mask.shape != lead or (ref_logp is not None and ref_logp.shape != lead):
        raise ValueError("old_logp, mask and ref_logp must have the shape of targets")
    check_same_device("linear_policy_loss", hidden=hidden, weight=weight, old_logp=old_logp,
                      advantages=advantages, mask=mask, ref_logp=ref_logp)
    T = lead[-1]
    H = hidden.shape[-1]
    V = weight.shape[0]
    R = targets.numel() // T if T else 0
    if advantages.shape == lead:
        adv = advantages.reshape(-1)
    elif advantages.shape == lead[:-1]:
        adv = contiguous(advantages.reshape(R, 1).expand(R, T)).reshape(-1)
    else:
        raise ValueError(f"advantages must be per sequence {tuple(lead[:-1])} or per token {tuple(lead)}")
    mask2 = mask.reshape(R, T)
    row_scale = contiguous(_row_scale(mask2, agg, normalizer).reshape(R, 1).expand(R, T)).reshape(-1)
    x = hidden.reshape(-1, H)
    if x.stride(-1) != 1:
        x = contiguous(x)
    N = x.shape[0]
    grad = torch.is_grad_enabled()
    need_x = grad and hidden.requires_grad
    need_w = grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    chunk = chunk_tokens_for(N, V, x.dtype, x.device, chunk_tokens, defaults=_DEFAULT_WORKSPACE_MIB)
    parts, logp, ent, _, _, _ = linear_policy_loss_fwd_op(
        x, weight, bias, targets.reshape(-1), old_logp.reshape(-1), adv.to(torch.float32), mask.reshape(-1),
        ref_logp.reshape(-1) if ref_logp is not None else None, row_scale, 1.0 / float(temperature),
        float(clip_low), float(clip_high), float(beta), bool(return_entropy), int(chunk),
        bool(need_x), bool(need_w), bool(need_b),
    )
    loss = parts.select(0, 0)
    p = parts.detach()
    n_tok = p.select(0, 4).clamp(min=1.0)
    stats = {"clip_frac": p.select(0, 1) / n_tok, "ratio_mean": p.select(0, 2) / n_tok,
             "kl_mean": p.select(0, 3) / n_tok, "logp": logp.view(lead),
             "entropy": ent.view(lead) if return_entropy else None}
    return loss, stats
