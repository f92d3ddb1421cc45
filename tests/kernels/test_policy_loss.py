"""group_advantages, clipped_policy_loss and grouped_policy_loss (PyTorch path) against the
line-by-line references; every loss option."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_testlib import check_group_advantages, check_grouped, check_policy_loss, loss_inputs

from axpo.kernels import clipped_policy_loss, group_advantages, grouped_policy_loss
from axpo.kernels.reference import clipped_policy_loss_ref, group_advantages_ref


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("with_sub", [False, True])
def test_group_advantages(mode, with_sub):
    check_group_advantages(mode, with_sub)


def test_group_advantages_details():
    r = torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 7.0])
    ids = torch.tensor([10, 10, 10, -1, -1, 99])
    adv, st_ = group_advantages(r, ids, return_group_stats=True)
    std = torch.tensor([1.0, 3.0, 5.0]).std()  # Bessel
    torch.testing.assert_close(adv[:3], (torch.tensor([1.0, 3.0, 5.0]) - 3.0) / (std + 1e-6))
    assert adv[3] == 0 and adv[4] == 0 and adv[5] == 0  # zero variance, singleton
    assert st_["zero_std"].tolist() == [True, False, False]  # segments sorted by id: -1, 10, 99
    torch.testing.assert_close(group_advantages(r, ids, mode="dr_grpo")[:3], torch.tensor([-2.0, 0.0, 2.0]))
    with pytest.raises(ValueError):
        group_advantages(r, ids, mode="ppo")


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.integers(-5, 5), min_size=1, max_size=40),
    mode=st.sampled_from(["grpo", "dr_grpo"]),
    seed=st.integers(0, 1000),
    offset=st.sampled_from([0.0, 1e3]),
)
def test_group_advantages_property(ids, mode, seed, offset):
    ids = torch.tensor(ids)
    r = torch.randn(len(ids), generator=torch.Generator().manual_seed(seed)).double() + offset
    sub = torch.tensor([i % 2 for i in range(len(ids))])
    for s in (None, sub):
        a = group_advantages(r, ids, subgroup_ids=s, mode=mode)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, group_advantages_ref(r, ids, subgroup_ids=s, mode=mode), rtol=1e-7, atol=1e-7)


OPTIONS = list(itertools.product(["seq", "token"], ["token-mean", "seq-mean-token-mean"], [(0.2, 0.2), (0.1, 0.35)]))


@pytest.mark.parametrize("adv_kind,agg,clips", OPTIONS)
@pytest.mark.parametrize("beta,with_ref", [(0.0, False), (0.05, True), (0.0, True)])
def test_clipped_loss_options(adv_kind, agg, clips, beta, with_ref):
    check_policy_loss(adv_kind, agg, beta, with_ref, *clips)


@pytest.mark.parametrize("agg,normalizer", [("token-mean", 123.0), ("seq-mean-token-mean", torch.tensor(16.0))])
def test_global_normalizer(agg, normalizer):
    check_policy_loss("seq", agg, 0.04, True, 0.2, 0.28, normalizer=normalizer)


def test_clip_stats_both_edges_nontrivial():
    _, stats = check_policy_loss("seq", "token-mean", 0.0, False, 0.05, 0.05)
    assert 0 < stats["clip_frac"].item() < 1


def test_tie_convention():
    """Ratio exactly 1 (logp == old: both branches tie) and at the upper clip edge: the gradient
    is -r*A, as torch.minimum + torch.clamp give (ties split the gradient and clamp passes it)."""
    logp = torch.tensor([[-1.0, -2.0, -3.0, -1.5]])
    old = logp.clone()
    old[0, 2] = logp[0, 2] - torch.log(torch.tensor(1.25))  # r ~ 1 + clip_high, within an ulp
    adv = torch.tensor([0.7])
    mask = torch.ones_like(logp, dtype=torch.bool)
    x = logp.clone().requires_grad_()
    loss, _ = clipped_policy_loss(x, old, adv, mask, clip_high=0.25)
    (g,) = torch.autograd.grad(loss, x)
    x2 = logp.clone().requires_grad_()
    loss2, _ = clipped_policy_loss_ref(x2, old, adv, mask, clip_high=0.25)
    (g2,) = torch.autograd.grad(loss2, x2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(g, g2)
    torch.testing.assert_close(g[0, 0], torch.tensor(-0.7 / 4))


def test_garbage_in_masked_tokens_stays_out():
    logp, old, ref, mask = loss_inputs()
    old = old.clone()
    old[~mask] = -1e30  # ratio = inf on masked tokens
    x = logp.clone().requires_grad_()
    loss, stats = clipped_policy_loss(x, old, torch.randn(logp.shape[0]), mask, ref_logp=ref, beta=0.1)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and all(torch.isfinite(v) for v in stats.values())
    assert (g[~mask] == 0).all()


def test_stats_are_tensors_and_nograd():
    logp, old, ref, mask = loss_inputs()
    with torch.no_grad():
        loss, stats = clipped_policy_loss(logp, old, torch.randn(logp.shape[0]), mask)
    assert isinstance(loss, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in stats.values())
    assert stats["kl_mean"].item() == 0.0


def test_bad_inputs():
    logp, old, ref, mask = loss_inputs()
    with pytest.raises(ValueError):
        clipped_policy_loss(logp, old, torch.randn(3), mask)
    with pytest.raises(ValueError):
        clipped_policy_loss(logp, old, torch.randn(logp.shape[0]), mask, agg="sum")


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("with_sub", [False, True])
@pytest.mark.parametrize("agg,beta", [("token-mean", 0.0), ("seq-mean-token-mean", 0.04)])
def test_grouped_equals_composed(mode, with_sub, agg, beta):
    check_grouped(mode, with_sub, agg, beta)


def test_grouped_zero_std_flag():
    logp, old, ref, mask = loss_inputs(R=4, T=5)
    r = torch.tensor([1.0, 1.0, 0.0, 2.0])
    ids = torch.tensor([3, 3, 8, 8])
    _, stats = grouped_policy_loss(logp, old, mask, r, ids)
    assert stats["zero_std_frac"].item() == 0.5
    assert (stats["advantages"][:2] == 0).all()
