"""CUDA paths, run only where a GPU is present (the `gpu` marker; skipped elsewhere by conftest):
the compiled Triton kernels against the fp64 references, and the rollout engine on the device
against a full forward. The same checks run on CPU elsewhere (interpreter / torch path)."""

import copy

import pytest
import torch

from axpo.kernels import (clipped_policy_loss, grouped_policy_loss, linear_logprob_entropy, linear_policy_loss,
                          logprob_entropy)
from axpo.kernels.reference import (clipped_policy_loss_ref, grouped_policy_loss_ref,
                                    linear_logprob_entropy_ref, logprob_entropy_ref)

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [151936, 2053, 123])
def test_logprob_entropy_triton_vs_fp64(dtype, V):
    g = torch.Generator(device=DEV).manual_seed(0)
    logits = (torch.randn(289, V + 3, device=DEV, generator=g) * 4).to(dtype)[:, :V]  # strided rows
    logits[0, : V // 2] = float("-inf")
    targets = torch.randint(0, V, (289,), device=DEV, generator=g)
    targets[0] = V - 1
    x = logits.detach().requires_grad_(True)
    lp, ent = logprob_entropy(x, targets, temperature=0.7)
    lp64, ent64 = logprob_entropy_ref(logits.double(), targets, temperature=0.7)
    same_lp, same_ent = logprob_entropy_ref(logits, targets, temperature=0.7, compute_dtype=dtype)
    for ours, ref, same in ((lp, lp64, same_lp), (ent, ent64, same_ent)):
        err = (ours.double() - ref).abs().max().item()
        base = (same.double() - ref).abs().max().item()
        assert err <= base + 2e-5 * (1 + ref.abs().max().item())
    up = torch.randn_like(lp)
    (lp * up + ent * up.flip(0)).sum().backward()
    xr = logits.double().detach().requires_grad_(True)
    a, b = logprob_entropy_ref(xr, targets, temperature=0.7)
    (a * up.double() + b * up.flip(0).double()).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_linear_logprob_entropy_cuda_vs_reference():
    g = torch.Generator(device=DEV).manual_seed(1)
    h = torch.randn(1937, 256, device=DEV, generator=g, requires_grad=True)
    w = (torch.randn(32000, 256, device=DEV, generator=g) * 0.05).requires_grad_(True)
    t = torch.randint(0, 32000, (1937,), device=DEV, generator=g)
    lp, ent = linear_logprob_entropy(h, w, t)
    (lp.sum() + ent.sum()).backward()
    h2, w2 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    a, b = linear_logprob_entropy_ref(h2, w2, t)
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(lp.double(), a, atol=1e-4, rtol=0)
    torch.testing.assert_close(h.grad.double(), h2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_head_multichunk_low_precision_dw(dtype, monkeypatch):
    """Issue #19: several chunks accumulate dW in fp32 through mm(out_dtype=fp32); the first chunk
    must write the accumulator (it is torch.empty, here filled with NaN by the poison mode)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("axpo.kernels.dispatch"), "POISON_EMPTY", True)
    g = torch.Generator(device=DEV).manual_seed(3)
    N, H, V = 1000, 128, 5003
    h = torch.randn(N, H, device=DEV, generator=g).to(dtype)
    w = (torch.randn(V, H, device=DEV, generator=g) * 0.05).to(dtype)
    t = torch.randint(0, V, (N,), device=DEV, generator=g)
    up = torch.randn(N, device=DEV, generator=g)

    def grads(fn, hh, ww, **kw):
        hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
        lp, ent = fn(hh, ww, t, **kw)
        ((lp * up).sum() + (ent * up.flip(0)).sum()).backward()
        return hh.grad, ww.grad

    dx, dw = grads(linear_logprob_entropy, h, w, chunk_tokens=137)  # 8 chunks
    dx64, dw64 = grads(linear_logprob_entropy_ref, h.double(), w.double(), compute_dtype=torch.float64)
    dxs, dws = grads(linear_logprob_entropy_ref, h, w, compute_dtype=dtype)
    for ours, ref, same in ((dx, dx64, dxs), (dw, dw64, dws)):
        assert torch.isfinite(ours).all()
        err = (ours.double() - ref).abs().max().item()
        base = (same.double() - ref).abs().max().item()
        assert err <= base + 2e-2 * (1 + ref.abs().max().item()), (err, base)


def test_linear_policy_loss_cuda_equals_composed():
    g = torch.Generator(device=DEV).manual_seed(4)
    B, T, H, V = 4, 300, 256, 32000
    h = torch.randn(B, T, H, device=DEV, generator=g)
    w = torch.randn(V, H, device=DEV, generator=g) * 0.05
    t = torch.randint(0, V, (B, T), device=DEV, generator=g)
    old = -torch.rand(B, T, device=DEV, generator=g) * 8
    ref = old + 0.1 * torch.randn(B, T, device=DEV, generator=g)
    adv = torch.randn(B, device=DEV, generator=g)
    mask = torch.rand(B, T, device=DEV, generator=g) > 0.2
    kw = dict(ref_logp=ref, beta=0.04, clip_high=0.28)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    l1, s1 = linear_policy_loss(h1, w1, t, old, adv, mask, chunk_tokens=256, **kw)
    (2.0 * l1).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, _ = linear_logprob_entropy(h2, w2, t, chunk_tokens=256)
    l2, s2 = clipped_policy_loss(lp, old, adv, mask, **kw)
    (2.0 * l2).backward()
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_policy_losses_cuda_vs_reference():
    g = torch.Generator(device=DEV).manual_seed(2)
    B, T = 12, 77
    logp = (-torch.rand(B, T, device=DEV, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, device=DEV, generator=g)
    ref = logp.detach() + 0.1 * torch.randn(B, T, device=DEV, generator=g)
    mask = (torch.rand(B, T, device=DEV, generator=g) > 0.3).float()
    rewards = torch.randint(0, 2, (B,), device=DEV, generator=g).float()
    groups = torch.tensor([5, 5, 9, 9, 9, 1, 1, 1, 1, 7, 3, 3], device=DEV)
    kw = dict(clip_low=0.2, clip_high=0.28, ref_logp=ref, beta=0.05)
    for agg in ("token-mean", "seq-mean-token-mean"):
        ours, _ = grouped_policy_loss(logp, old, mask, rewards, groups, agg=agg, **kw)
        want, _ = grouped_policy_loss_ref(logp.double(), old.double(), mask.double(), rewards.double(), groups,
                                          agg=agg, **{**kw, "ref_logp": ref.double()})
        torch.testing.assert_close(ours.double(), want, atol=1e-5, rtol=1e-5)
        adv = torch.randn(B, T, device=DEV, generator=g)
        ours, _ = clipped_policy_loss(logp, old, adv, mask, agg=agg, **kw)
        want, _ = clipped_policy_loss_ref(logp.double(), old.double(), adv.double(), mask.double(), agg=agg,
                                          **{**kw, "ref_logp": ref.double()})
        torch.testing.assert_close(ours.double(), want, atol=1e-5, rtol=1e-5)


def test_engine_greedy_on_cuda_matches_full_forward(tiny_model):
    from axpo.rollout.engine import Engine, SamplingParams

    model = copy.deepcopy(tiny_model).to(DEV)
    eng = Engine(model, max_kv_tokens=8192)
    prompt = list(range(10, 60))
    seq = eng.add(prompt)
    out = eng.generate([seq], SamplingParams(temperature=0, max_tokens=12))[0]
    ids = torch.tensor([prompt + out.token_ids], device=DEV)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    want = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert out.token_ids == want
