"""linear_policy_loss (fused LM head + clipped policy loss, gradients in the forward) against the
composed fp64 reference, on the PyTorch path (its own fp32 epilogue, the generic one for bf16)."""

import importlib

import pytest
import torch
from kernels_testlib import NewStorageTracker, check_linear_policy_loss

from axpo.kernels import clipped_policy_loss, linear_logprob_entropy, linear_policy_loss

dispatch = importlib.import_module("axpo.kernels.dispatch")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")
    monkeypatch.setattr(dispatch, "POISON_EMPTY", True)  # stale memory would show as NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,V,chunk", [(2, 7, 16, 123, 3), (3, 5, 8, 2053, 4), (1, 1, 16, 517, None),
                                           (2, 3, 8, 151936, 2)])
def test_shapes_dtypes_chunks(B, T, H, V, chunk, dtype):
    check_linear_policy_loss(B, T, H, V, dtype, chunk_tokens=chunk, masked_targets=(2,) if B * T > 2 else ())


@pytest.mark.parametrize("adv_kind", ["seq", "token"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("beta,with_ref", [(0.0, False), (0.05, True)])
def test_loss_options(adv_kind, agg, beta, with_ref):
    check_linear_policy_loss(3, 9, 16, 1031, torch.float32, adv_kind=adv_kind, agg=agg, beta=beta,
                             with_ref=with_ref, chunk_tokens=5, masked_targets=(4, 20))


@pytest.mark.parametrize("temperature", [0.7, 1.5])
@pytest.mark.parametrize("return_entropy", [True, False])
def test_bias_temperature_entropy(temperature, return_entropy):
    check_linear_policy_loss(2, 11, 24, 777, torch.float32, bias=True, temperature=temperature, chunk_tokens=4,
                             return_entropy=return_entropy, beta=0.04, with_ref=True)
    check_linear_policy_loss(2, 11, 24, 777, torch.bfloat16, bias=True, temperature=temperature, chunk_tokens=4,
                             return_entropy=return_entropy)


@pytest.mark.parametrize("agg,normalizer", [("token-mean", 123.0), ("seq-mean-token-mean", torch.tensor(16.0))])
def test_global_normalizer(agg, normalizer):
    check_linear_policy_loss(2, 6, 8, 300, torch.float32, agg=agg, normalizer=normalizer, chunk_tokens=5)


def _inputs(seed=0, B=3, T=8, H=16, V=999):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g) * 7
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    return h, w, t, old, ref, adv, mask


def test_equals_composed_ops_and_scales_with_upstream_grad():
    """Same loss, stats and gradients as linear_logprob_entropy + clipped_policy_loss; the
    backward scales by the upstream gradient (here 3, as update.py multiplies by the world size)."""
    h, w, t, old, ref, adv, mask = _inputs()
    kw = dict(ref_logp=ref, beta=0.04, clip_high=0.28)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss1, st1 = linear_policy_loss(h1, w1, t, old, adv, mask, chunk_tokens=5, **kw)
    (3.0 * loss1).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = linear_logprob_entropy(h2, w2, t, chunk_tokens=5)
    loss2, st2 = clipped_policy_loss(lp, old, adv, mask, **kw)
    (3.0 * loss2).backward()
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-7)
    for k in st2:
        torch.testing.assert_close(st1[k], st2[k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st1["logp"], lp.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st1["entropy"], ent.detach(), rtol=1e-6, atol=1e-6)
    # the fused epilogue forms p as exp(z - m) / s, the other as exp(z - m - log s): ulp-level
    # differences (accuracy against fp64 is checked by check_linear_policy_loss)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_and_frozen_inputs():
    h, w, t, old, ref, adv, mask = _inputs(1)
    with torch.no_grad():
        l0, s0 = linear_policy_loss(h, w, t, old, adv, mask)
    hh = h.clone().requires_grad_()  # weight frozen: only dhidden
    l1, s1 = linear_policy_loss(hh, w, t, old, adv, mask)
    l1.backward()
    torch.testing.assert_close(l0, l1.detach(), rtol=0, atol=0)
    assert hh.grad is not None and w.grad is None
    assert not s1["logp"].requires_grad and not s1["clip_frac"].requires_grad


def test_backward_twice_raises():
    h, w, t, old, ref, adv, mask = _inputs(2)
    ww = w.clone().requires_grad_()
    loss, _ = linear_policy_loss(h, ww, t, old, adv, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_garbage_hidden_behind_masked_targets():
    """Overflowing hidden states on a position whose target is -100: exactly zero gradient there, finite
    elsewhere (the 0 * NaN case of the in-place epilogue)."""
    h, w, t, old, ref, adv, mask = _inputs(3)
    h = h.clone()
    h[0, 2] = 1e30  # finite, but its logits overflow to +-inf (NaN after the max shift)
    t = t.clone()
    t[0, 2] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, st = linear_policy_loss(hh, ww, t, old, adv, mask, chunk_tokens=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(ww.grad).all()
    assert (hh.grad[0, 2] == 0).all() and torch.isfinite(hh.grad).all()


def test_never_materialises_full_logits():
    B, T, H, V = 4, 24, 16, 4099
    h, w, t, old, ref, adv, mask = _inputs(4, B, T, H, V)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with NewStorageTracker() as tr:
        loss, _ = linear_policy_loss(hh, ww, t, old, adv, mask, ref_logp=ref, beta=0.1, chunk_tokens=8)
        loss.backward()
    assert max(tr.sizes) <= max(V * H, 8 * V), max(tr.sizes)
    assert not [s for s in tr.sizes if s >= B * T * V // 2]


def test_input_validation():
    h, w, t, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError):
        linear_policy_loss(h, w, t, old, torch.randn(5), mask)
    with pytest.raises(ValueError):
        linear_policy_loss(h, w, t, old, adv, mask, agg="sum")
    with pytest.raises(ValueError):
        linear_policy_loss(h, w, t, old[:, :-1], adv, mask)


@pytest.mark.parametrize("return_entropy", [True, False])
def test_one_row_blocks_small_vocab(return_entropy, monkeypatch):
    """One row per epilogue block (what V > 131072 gets) at a small V."""
    lpl = importlib.import_module("axpo.kernels.linear_policy_loss")
    monkeypatch.setattr(lpl, "ROW_BLOCK_ELEMS", 1)
    check_linear_policy_loss(2, 7, 16, 2053, torch.float32, bias=True, temperature=0.7, beta=0.04, with_ref=True,
                             chunk_tokens=4, masked_targets=(3,), return_entropy=return_entropy)


def test_accuracy_at_llm_vocab_beats_torch_fp32():
    """logp and entropy of the CPU epilogue at V=151936 against fp64: within 1e-5 (PyTorch's fp32
    log_softmax is ~3e-5 off here), so the fused op stays more accurate than the unfused head."""
    lpl = importlib.import_module("axpo.kernels.linear_policy_loss")
    V, n = 151936, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, V, generator=g) * 3
    tgt = torch.randint(0, V, (n,), generator=g)
    ref = torch.log_softmax(x.double(), 1)
    lp64, h64 = ref.gather(1, tgt[:, None]).squeeze(1), -(ref.exp() * ref).sum(1)
    zero, on = torch.zeros(n), torch.ones(n, dtype=torch.bool)
    lp, ent, _ = lpl._torch_epilogue(x.clone(), tgt, zero, zero, on, None, torch.full((n,), 1.0 / n), 1.0, 0.2, 0.2,
                                     0.0, True, False, lpl.epilogue_scratch(V, "cpu"))
    assert (lp.double() - lp64).abs().max() < 1e-5
    assert (ent.double() - h64).abs().max() < 1e-5
