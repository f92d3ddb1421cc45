"""linear_policy_loss on CPU fp32 leaves e - s 1[j = y] in the logits workspace and scales the [chunk, H]
GEMM operands by the row factor a = -g / (s T) (dX_c = a (E' W), dW += E'^T (a X_c), db += E'^T a) instead of
turning the workspace into dlogits. These cases are where such a decomposition goes wrong if a term is
missing or misplaced: several chunks (the last one partial), bias, temperature != 1, invalid targets (no
target term), rows of garbage hidden states behind masked targets (NaN logits: exactly zero contribution),
very confident rows (p_y ~ 1: 1 - p_y is a small difference), tokens sharing a target, -inf logits.
Everything against the fp64 composed reference, no worse than PyTorch fp32 (the project's rule)."""

import importlib

import pytest
import torch

from axpo.kernels import linear_policy_loss
from axpo.kernels.reference import clipped_policy_loss_ref, linear_logprob_entropy_ref

lpl = importlib.import_module("axpo.kernels.linear_policy_loss")
dispatch = importlib.import_module("axpo.kernels.dispatch")

TOL32 = 2e-5  # the fp32 tolerance of tests/kernels/kernels_testlib.py


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")
    monkeypatch.setattr(dispatch, "POISON_EMPTY", True)  # stale memory would show as NaN


def _no_worse(ours, ref64, same, what):
    ours, ref64, same = ours.double(), ref64.double(), same.double()
    assert torch.isfinite(ours).all(), f"{what}: not finite"
    err = (ours - ref64).abs().max().item()
    base = (same - ref64).abs().max().item()
    tol = TOL32 * (1.0 + ref64.abs().max().item())
    assert err <= base + tol, f"{what}: ours {err:.3e} > torch-fp32 {base:.3e} + tol {tol:.3e}"


def _case(seed, V, neg_inf_bias):
    B, T, H = 2, 40, 24
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    bias = torch.randn(V, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    if neg_inf_bias:  # a vocabulary masked through the bias: -inf logits in every row
        bias[1::7] = float("-inf")
        targets = torch.where(targets % 7 == 1, targets - 1, targets)
    h, t = hidden.view(-1, H), targets.view(-1)
    t[0] = V - 1 if not neg_inf_bias else V - 2
    confident = list(range(2, 80, 3))
    shared = int(t[2])
    for i, r in enumerate(confident):  # logit_y far above the rest: 1 - p_y from ~1e-2 down to below fp32
        if i % 2:
            t[r] = shared  # and many of them share one target (one dW row collects them)
        y = int(t[r])
        h[r] = weight[y] / weight[y].norm() ** 2 * (6.0 + 2.5 * i) + 0.05 * h[r]
    masked = [4, 13, 41]
    t[masked] = -100
    t[22] = V + 3  # out of range on the other side
    garbage = [13, 41]
    h[13] = 3e38  # finite hidden states whose logits overflow to +-inf: NaN after the max shift
    h[41] = -3e38
    return hidden, weight, bias, targets, masked + [22], garbage, confident


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("neg_inf_bias", [False, True])
def test_scaled_operands_against_fp64(temperature, neg_inf_bias):
    V = 1031
    hidden, weight, bias, targets, masked, garbage, confident = _case(0, V, neg_inf_bias)
    B, T, H = hidden.shape
    with torch.no_grad():
        assert not torch.isfinite(hidden.view(-1, H)[garbage] @ weight.t() + bias).all(1).any()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        clean = hidden.clone()
        clean.view(-1, H)[garbage] = 0.0
        lp0, _ = linear_logprob_entropy_ref(clean.double(), weight.double(), targets, bias=bias.double(),
                                            temperature=temperature)
    old = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.15
    mask.view(-1)[confident] = True
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    loss, st = linear_policy_loss(h, w, targets, old, adv, mask, bias=b, temperature=temperature, ref_logp=ref,
                                  chunk_tokens=6, **kw)
    loss.backward()

    def composed(dtype):
        # the garbage rows have masked targets: by definition they contribute nothing, so the reference runs
        # without them (PyTorch's own backward would spread their NaN logits into dW)
        hh = clean.to(dtype).requires_grad_()
        ww = weight.to(dtype).requires_grad_()
        bb = bias.to(dtype).requires_grad_()
        lp, ent = linear_logprob_entropy_ref(hh, ww, targets, bias=bb, temperature=temperature, compute_dtype=dtype)
        c = lambda x: x.to(dtype)  # noqa: E731
        lo, _ = clipped_policy_loss_ref(lp, c(old), c(adv), mask, ref_logp=c(ref), **kw)
        lo.backward()
        return lo.detach(), lp.detach(), ent.detach(), hh.grad, ww.grad, bb.grad

    r64, r32 = composed(torch.float64), composed(torch.float32)
    ours = (loss.detach(), st["logp"], st["entropy"], h.grad, w.grad, b.grad)
    for name, o, r, s in zip(("loss", "logp", "entropy", "dhidden", "dweight", "dbias"), ours, r64, r32):
        _no_worse(o, r, s, name)
    # the confident rows on their own scale (their gradients are small differences)
    rows = confident
    _no_worse(h.grad.view(-1, H)[rows], r64[3].view(-1, H)[rows], r32[3].view(-1, H)[rows], "dhidden, confident rows")
    y = torch.unique(targets.view(-1)[rows])
    _no_worse(w.grad[y], r64[4][y], r32[4][y], "dweight, confident targets' rows")
    for r in masked:
        assert st["logp"].view(-1)[r] == 0
        assert (h.grad.view(-1, H)[r] == 0).all(), "a masked target must get exactly zero dhidden"
    if neg_inf_bias:  # -inf logits: zero gradient there, finite entropy
        assert (b.grad[1::7] == 0).all() and (w.grad[1::7] == 0).all()
        assert torch.isfinite(st["entropy"]).all()


def test_scale_out_matches_in_place_dlogits():
    """`_torch_epilogue(..., scale_out=a)` leaves E' in the workspace with a[:, None] * E' the dlogits the
    in-place form writes (same arithmetic), and those dlogits match fp64 softmax gradients; at V=151936 with
    -inf logits, confident rows, an invalid target and a NaN row behind a masked target."""
    V, n = 151936, 12
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, V, generator=g) * 3
    tgt = torch.randint(0, V, (n,), generator=g)
    x[:, ::11] = float("-inf")
    tgt = torch.where(tgt % 11 == 0, tgt + 1, tgt)
    x[1, tgt[1]] = 60.0  # p_y = 1 in fp32
    x[2, tgt[2]] = x[2].max() + 9.0  # 1 - p_y ~ 1e-3
    tgt[5] = -100
    x[7] = float("nan")
    tgt[7] = -100
    old = torch.zeros(n)
    adv = torch.randn(n, generator=g)
    on = torch.ones(n, dtype=torch.bool)
    rs = torch.full((n,), 1.0 / n)
    inv_t = 1 / 0.8
    args = (tgt, old, adv, on, None, rs, inv_t, 0.2, 0.28, 0.0, True, True)
    scratch = lpl.epilogue_scratch(V, "cpu")
    d_in = x.clone()
    lp1, ent1, p1 = lpl._torch_epilogue(d_in, *args, scratch)
    e = x.clone()
    a = torch.empty(n)
    lp2, ent2, p2 = lpl._torch_epilogue(e, *args, scratch, scale_out=a)
    assert torch.equal(lp1, lp2) and torch.equal(ent1, ent2) and torch.equal(p1, p2)
    assert torch.equal(a[:, None] * e, d_in)
    assert (a[[5, 7]] == 0).all() and (e[7] == 0).all() and (d_in[7] == 0).all()
    # against fp64: dlogits = (g / T) (onehot - softmax(z / T)), g from the fp32 loss
    valid = (tgt >= 0) & (tgt < V)
    z64 = x.double() * inv_t
    p64 = torch.softmax(z64, 1)
    lp64 = torch.log_softmax(z64, 1).gather(1, tgt.clamp(0, V - 1)[:, None]).squeeze(1)
    ok = valid.clone()
    assert (lp1[ok].double() - lp64[ok]).abs().max() < 1e-5
    safe = torch.where(p64 > 0, torch.log(p64), torch.zeros_like(p64))
    h64 = -(p64 * safe).sum(1)
    assert (ent1[ok].double() - h64[ok]).abs().max() < 1e-5
    # dloss/dlogp of the fp32 loss (what the epilogue differentiates), then (g / T) (onehot - p) in fp64
    dl, _ = lpl._loss_torch(lp1[:, None], old[:, None], adv[:, None], on[:, None], None, rs, 0.2, 0.28, 0.0)
    gt = torch.where(ok, dl.squeeze(1).double() * inv_t, torch.zeros((), dtype=torch.float64))
    ref = gt[:, None] * (-p64)
    ref[ok, tgt[ok]] += gt[ok]
    ref[~ok] = 0
    err = (d_in.double() - ref).abs().max().item()
    assert err <= 1e-6 * gt.abs().max().item(), err / gt.abs().max().item()


def test_frozen_hidden_same_weight_and_bias_grads():
    """Without dhidden there is no dX_c to hold a X_c: a separate [chunk, H] buffer does; same dW and db."""
    hidden, weight, bias, targets, *_ = _case(2, 517, False)
    hidden = hidden.clamp(-50, 50)
    B, T, H = hidden.shape
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(B, T, generator=g) * 5
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    grads = []
    for with_x in (True, False):
        h = hidden.clone().requires_grad_(with_x)
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        loss, _ = linear_policy_loss(h, w, targets, old, adv, mask, bias=b, temperature=0.9, chunk_tokens=7)
        loss.backward()
        assert (h.grad is not None) == with_x
        grads.append((w.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
