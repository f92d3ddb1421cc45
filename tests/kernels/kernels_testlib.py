"""Checks shared by the PyTorch-path tests and the Triton-interpreter tests.

The rule (shared/design/kernels.md): the reference is computed in float64 *from the same
low-precision inputs*, and ours must be no worse than PyTorch in the input dtype:
    max|ours - ref64| <= max|torch_same_dtype - ref64| + tol.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from axpo.kernels import (
    clipped_policy_loss,
    group_advantages,
    grouped_policy_loss,
    linear_logprob_entropy,
    logprob_entropy,
)
from axpo.kernels.reference import (
    clipped_policy_loss_ref,
    group_advantages_ref,
    grouped_policy_loss_ref,
    linear_logprob_entropy_ref,
    logprob_entropy_ref,
)

TOL = {torch.float32: 2e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_no_worse(ours, ref64, same, dtype, what="", scale=None):
    """max|ours - ref64| <= max|same - ref64| + tol * (1 + max|ref64|)."""
    ours, ref64, same = ours.double(), ref64.double(), same.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(ours), finite), f"{what}: non-finite pattern differs"
    if not finite.any():
        return
    err = (ours - ref64)[finite].abs().max().item()
    base = (same - ref64)[finite].abs()
    base = base[torch.isfinite(base)].max().item() if torch.isfinite(base).any() else 0.0
    s = ref64[finite].abs().max().item() if scale is None else scale
    tol = TOL[dtype] * (1.0 + s)
    assert err <= base + tol, f"{what}: ours {err:.3e} > torch-{dtype} {base:.3e} + tol {tol:.3e}"


def make_logits(N, V, dtype, *, scale=3.0, seed=0, kind="randn", shifted=False):
    """Logits [N, V] (or a non-contiguous shifted view [B, T-1, V] when shifted=True)."""
    g = torch.Generator().manual_seed(seed)
    if shifted:
        B = 2
        T = N // B + 1
        x = torch.randn(B, T, V, generator=g) * scale
        x = _adversarial(x, kind, g)
        return x.to(dtype)[:, :-1]
    x = torch.randn(N, V, generator=g) * scale
    return _adversarial(x, kind, g).to(dtype)


def _adversarial(x, kind, g):
    V = x.shape[-1]
    if kind == "tiles":  # vocabulary blocks with very different maxima
        blk = max(1, V // 7)
        for i, c in enumerate(range(0, V, blk)):
            x[..., c : c + blk] += 20.0 if i % 2 else -20.0
    elif kind == "neginf":  # -inf logits, including whole leading tiles
        x[..., : V // 2] = float("-inf")
        x[..., V // 2 :: 3] = float("-inf")
    elif kind == "negative":  # all strongly negative
        x = x - 1e4
    elif kind == "fp16max":  # large magnitudes that still fit fp16
        x = x * 2e3
    return x


def pick_targets(shape, V, kind, g=None):
    g = g or torch.Generator().manual_seed(1)
    t = torch.randint(0, V, shape, generator=g)
    flat = t.view(-1)
    flat[0] = V - 1  # target in the last partial tile
    if kind == "neginf":  # keep targets on finite logits (columns V//2 + 1, +2 mod 3 are finite)
        finite = torch.tensor([c for c in range(V // 2, V) if (c - V // 2) % 3 != 0])
        flat.copy_(finite[torch.randint(0, len(finite), (flat.numel(),), generator=g)])
    return t


def check_logprob_entropy(logits, targets, temperature, grad_mode, *, masked_rows=()):
    """Forward values and gradients (logp only / entropy only / both) against ref64."""
    dtype = logits.dtype
    tg = targets.clone()
    for r in masked_rows:
        tg.view(-1)[r] = -100
    g = torch.Generator().manual_seed(7)
    g_lp = torch.randn(tg.shape, generator=g)
    g_ent = torch.randn(tg.shape, generator=g)

    def run(fn, x, **kw):
        x = x.detach().requires_grad_()
        lp, ent = fn(x, tg, temperature=temperature, **kw)
        loss = 0.0
        if grad_mode in ("logp", "both"):
            loss = loss + (lp * g_lp.to(lp.dtype)).sum()
        if grad_mode in ("entropy", "both"):
            loss = loss + (ent * g_ent.to(ent.dtype)).sum()
        loss.backward()
        return lp.detach(), ent.detach(), x.grad

    lp, ent, grad = run(logprob_entropy, logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert grad.dtype == dtype and grad.shape == logits.shape
    lp64, ent64, grad64 = run(logprob_entropy_ref, logits.double(), compute_dtype=torch.float64)
    lps, ents, grads = run(logprob_entropy_ref, logits, compute_dtype=dtype)
    assert_no_worse(lp, lp64, lps, dtype, "logp")
    assert_no_worse(ent, ent64, ents, dtype, "entropy")
    assert_no_worse(grad, grad64, grads, dtype, "dlogits", scale=grad64[torch.isfinite(grad64)].abs().max().item())
    assert torch.isfinite(grad).all(), "NaN/inf in dlogits"
    flat_t = tg.view(-1)
    g2 = grad.reshape(-1, logits.shape[-1])
    for r in masked_rows:
        assert lp.view(-1)[r].item() == 0.0 and ent.view(-1)[r].item() == 0.0
        assert (g2[r] == 0).all(), "masked row must have exactly zero gradient"
    assert (flat_t[list(masked_rows)] == -100).all() if masked_rows else True
    # the no-grad fast path returns the same values
    with torch.no_grad():
        lp_ng, ent_ng = logprob_entropy(logits, tg, temperature=temperature)
    torch.testing.assert_close(lp_ng, lp, rtol=0, atol=0)
    torch.testing.assert_close(ent_ng, ent, rtol=0, atol=0)


def check_linear(N, H, V, dtype, *, bias, temperature, grad_mode, chunk_tokens, masked_rows=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = V - 1
    for r in masked_rows:
        targets[r] = -100
    g_lp = torch.randn(N, generator=g)
    g_ent = torch.randn(N, generator=g)

    def run(fn, h, w, bb, **kw):
        h = h.detach().requires_grad_()
        w = w.detach().requires_grad_()
        bb = bb.detach().requires_grad_() if bb is not None else None
        lp, ent = fn(h, w, targets, bias=bb, temperature=temperature, **kw)
        loss = 0.0
        if grad_mode in ("logp", "both"):
            loss = loss + (lp * g_lp.to(lp.dtype)).sum()
        if grad_mode in ("entropy", "both"):
            loss = loss + (ent * g_ent.to(ent.dtype)).sum()
        loss.backward()
        return lp.detach(), ent.detach(), h.grad, w.grad, (bb.grad if bb is not None else None)

    ours = run(linear_logprob_entropy, hidden, weight, b, chunk_tokens=chunk_tokens)
    ref = run(linear_logprob_entropy_ref, hidden.double(), weight.double(), b.double() if bias else None,
              compute_dtype=torch.float64)
    same = run(linear_logprob_entropy_ref, hidden, weight, b, compute_dtype=dtype)
    for name, o, r, s in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), ours, ref, same):
        if o is None:
            assert r is None
            continue
        assert o.dtype == (torch.float32 if name in ("logp", "entropy") else dtype), name
        assert_no_worse(o, r, s, dtype, name)
    for r in masked_rows:
        assert ours[0][r] == 0 and ours[1][r] == 0
        assert (ours[2][r] == 0).all(), "masked row must have exactly zero dhidden"
    return ours


class NewStorageTracker(TorchDispatchMode):
    """Records the element count of every storage freshly allocated by an aten op.

    An output is fresh when its storage is not one of the op's own inputs (views and out=
    variants alias an input; pointers cannot be compared across ops because the allocator reuses
    freed addresses).
    """

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = set()
        for a in list(args) + list(kwargs.values()):
            for t in a if isinstance(a, (tuple, list)) else (a,):
                if isinstance(t, torch.Tensor):
                    ins.add(t.untyped_storage().data_ptr())
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.sizes.append(t.untyped_storage().nbytes() // max(1, t.element_size()))
        return out


# -------------------------------------------------------------------------------------------------
# policy loss
# -------------------------------------------------------------------------------------------------


def loss_inputs(R=6, T=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(R, T, generator=g) * 0.5 - 2.0).to(dtype)
    # old != new, with ratios spread across both clip edges but never exactly on them
    old = (logp.float() + torch.randn(R, T, generator=g) * 0.3).to(dtype)
    ref = (logp.float() + torch.randn(R, T, generator=g) * 0.2).to(dtype)
    mask = torch.rand(R, T, generator=g) > 0.25
    mask[0] = False  # an empty sequence
    mask[1, 0] = True
    return logp, old, ref, mask


def check_policy_loss(adv_kind, agg, beta, with_ref, clip_low, clip_high, normalizer=None, R=6, T=11):
    logp, old, ref, mask = loss_inputs(R, T)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(R, generator=g) if adv_kind == "seq" else torch.randn(R, T, generator=g)
    kw = dict(clip_low=clip_low, clip_high=clip_high, beta=beta, agg=agg, normalizer=normalizer)
    x = logp.detach().requires_grad_()
    loss, stats = clipped_policy_loss(x, old, adv, mask, ref_logp=ref if with_ref else None, **kw)
    (dl,) = torch.autograd.grad(loss, x)
    x64 = logp.double().requires_grad_()
    loss64, stats64 = clipped_policy_loss_ref(
        x64, old.double(), adv.double(), mask, ref_logp=ref.double() if with_ref else None, **kw
    )
    (dl64,) = torch.autograd.grad(loss64, x64)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dl.double(), dl64, rtol=1e-5, atol=1e-7)
    assert (dl[~mask] == 0).all(), "masked tokens must get exactly zero gradient"
    for k in ("clip_frac", "ratio_mean", "kl_mean"):
        assert isinstance(stats[k], torch.Tensor) and stats[k].dim() == 0
        torch.testing.assert_close(stats[k].double(), stats64[k].double(), rtol=1e-5, atol=1e-6)
    return loss, stats


def check_group_advantages(mode, with_sub, S=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(S, generator=g)
    ids = torch.tensor([17, -4, 17, 900, 3, 3, 17, -4, 3, 55, 3, 17, 900, -4, 3, 8, 8, 8, 17, 3, 1000, 1000, 17])[:S]
    rewards[ids == 8] = 0.5  # a zero-variance group
    sub = torch.tensor([i % 3 for i in range(S)]) if with_sub else None
    adv = group_advantages(rewards, ids, subgroup_ids=sub, mode=mode)
    adv64 = group_advantages_ref(rewards.double(), ids, subgroup_ids=sub, mode=mode)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    assert (adv[ids == 55] == 0).all(), "a group of one gets 0"
    if not with_sub:
        assert (adv[ids == 8] == 0).all(), "zero-variance group gets 0"
    _, st = group_advantages(rewards, ids, subgroup_ids=sub, mode=mode, return_group_stats=True)
    return adv


def check_grouped(mode, with_sub, agg, beta, R=8, T=9):
    logp, old, ref, mask = loss_inputs(R, T, seed=5)
    g = torch.Generator().manual_seed(9)
    rewards = torch.randn(R, generator=g)
    ids = torch.tensor([7, 7, 3, 3, 3, 7, 42, 3])[:R]
    sub = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1])[:R] if with_sub else None
    kw = dict(subgroup_ids=sub, mode=mode, agg=agg, beta=beta, ref_logp=ref, clip_low=0.15, clip_high=0.28)
    x1 = logp.detach().requires_grad_()
    l1, s1 = grouped_policy_loss(x1, old, mask, rewards, ids, **kw)
    (d1,) = torch.autograd.grad(l1, x1)
    x2 = logp.detach().requires_grad_()
    adv = group_advantages(rewards, ids, subgroup_ids=sub, mode=mode)
    l2, s2 = clipped_policy_loss(x2, old, adv, mask, ref_logp=ref, beta=beta, agg=agg, clip_low=0.15, clip_high=0.28)
    (d2,) = torch.autograd.grad(l2, x2)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d1, d2, rtol=1e-6, atol=1e-8)
    for k in s2:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s1["advantages"], adv, rtol=1e-6, atol=1e-7)
    x3 = logp.double().requires_grad_()
    l3, _ = grouped_policy_loss_ref(x3, old.double(), mask, rewards.double(), ids, **{**kw, "ref_logp": ref.double()})
    torch.testing.assert_close(l1.double(), l3, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# fused head + loss
# -------------------------------------------------------------------------------------------------


def check_linear_policy_loss(B, T, H, V, dtype, *, bias=False, temperature=1.0, adv_kind="seq", agg="token-mean",
                             beta=0.0, with_ref=False, chunk_tokens=None, masked_targets=(), normalizer=None,
                             clip_low=0.2, clip_high=0.28, seed=0, return_entropy=True):
    """linear_policy_loss against the composed reference (linear_logprob_entropy_ref + the loss
    reference) in fp64 from the same inputs, no worse than the composed reference in `dtype`."""
    from axpo.kernels import linear_policy_loss

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets.view(-1)[0] = V - 1
    for r in masked_targets:
        targets.view(-1)[r] = -100
    with torch.no_grad():
        lp0, _ = linear_logprob_entropy_ref(hidden.double(), weight.double(), targets,
                                            bias=b.double() if bias else None, temperature=temperature)
    old = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_ref else None
    adv = torch.randn(B, generator=g) if adv_kind == "seq" else torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask.view(-1)[min(1, B * T - 1)] = True
    kw = dict(clip_low=clip_low, clip_high=clip_high, beta=beta, agg=agg, normalizer=normalizer)

    def leaves(cast):
        h = cast(hidden).detach().requires_grad_()
        w = cast(weight).detach().requires_grad_()
        bb = cast(b).detach().requires_grad_() if bias else None
        return h, w, bb

    h, w, bb = leaves(lambda t: t)
    loss, stats = linear_policy_loss(h, w, targets, old, adv, mask, bias=bb, temperature=temperature,
                                     ref_logp=ref, return_entropy=return_entropy, chunk_tokens=chunk_tokens, **kw)
    loss.backward()
    ours = [loss.detach(), stats["logp"], h.grad, w.grad] + ([bb.grad] if bias else [])

    def composed(cast, compute_dtype):
        h, w, bb = leaves(cast)
        lp, ent = linear_logprob_entropy_ref(h, w, targets, bias=bb, temperature=temperature,
                                             compute_dtype=compute_dtype)
        c = lambda t: t.to(lp.dtype) if t is not None else None  # noqa: E731
        lo, st = clipped_policy_loss_ref(lp, c(old), c(adv), mask, ref_logp=c(ref), **kw)
        lo.backward()
        return [lo.detach(), lp.detach(), h.grad, w.grad] + ([bb.grad] if bias else []), st, ent

    ref64, st64, ent64 = composed(lambda t: t.double(), torch.float64)
    same, st_same, _ = composed(lambda t: t, dtype)
    names = ["loss", "logp", "dhidden", "dweight", "dbias"]
    for name, o, r, s in zip(names, ours, ref64, same):
        assert o.dtype == (torch.float32 if name in ("loss", "logp") else dtype), name
        assert_no_worse(o, r, s, dtype, name)
    if return_entropy:
        assert stats["entropy"].shape == targets.shape
        assert_no_worse(stats["entropy"], ent64.detach(), ent64.detach().to(dtype), dtype, "entropy")
    else:
        assert stats["entropy"] is None
    for k in ("ratio_mean", "kl_mean"):
        assert_no_worse(stats[k], st64[k], st_same[k], dtype, k)
    if dtype == torch.float32:  # a count: exact unless a ratio sits within rounding of a clip edge
        torch.testing.assert_close(stats["clip_frac"].double(), st64["clip_frac"].double(), rtol=0, atol=1e-6)
    for r in masked_targets:
        assert stats["logp"].view(-1)[r] == 0
        assert (h.grad.view(-1, H)[r] == 0).all(), "a masked target must get exactly zero dhidden"
    return ours, stats
