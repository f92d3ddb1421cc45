"""linear_logprob_entropy (fused LM head) on the PyTorch path against the float64 reference."""

import pytest
import torch
from kernels_testlib import NewStorageTracker, check_linear

from axpo.kernels import linear_logprob_entropy
from axpo.kernels.linear_logprob_entropy import chunk_tokens_for


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V,chunk", [(7, 32, 123, 3), (33, 16, 2053, 8), (5, 8, 151936, 2), (1, 16, 517, None)])
def test_shapes_dtypes_chunks(N, H, V, chunk, dtype):
    check_linear(N, H, V, dtype, bias=False, temperature=1.0, grad_mode="both", chunk_tokens=chunk,
                 masked_rows=(N - 1,) if N > 2 else ())


@pytest.mark.parametrize("grad_mode", ["logp", "entropy", "both"])
@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_grad_paths_bias_temperature(grad_mode, temperature):
    check_linear(19, 24, 1031, torch.float32, bias=True, temperature=temperature, grad_mode=grad_mode,
                 chunk_tokens=6, masked_rows=(2, 11))


def test_bf16_bias_multichunk_fp32_accumulation():
    check_linear(40, 32, 777, torch.bfloat16, bias=True, temperature=0.7, grad_mode="both", chunk_tokens=7)


def test_chunking_does_not_change_results():
    a = check_linear(24, 16, 999, torch.float32, bias=True, temperature=1.0, grad_mode="both", chunk_tokens=24)
    b = check_linear(24, 16, 999, torch.float32, bias=True, temperature=1.0, grad_mode="both", chunk_tokens=5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_masked_rows_do_not_touch_weight_grad():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g)
    w = torch.randn(300, 16, generator=g).requires_grad_()
    t = torch.randint(0, 300, (10,), generator=g)
    t_masked = t.clone()
    t_masked[3:6] = -100
    lp, ent = linear_logprob_entropy(h, w, t_masked, chunk_tokens=4)
    (lp.sum() + ent.sum()).backward()
    w2 = w.detach().clone().requires_grad_()
    keep = torch.ones(10, dtype=torch.bool)
    keep[3:6] = False
    lp2, ent2 = linear_logprob_entropy(h[keep], w2, t[keep], chunk_tokens=4)
    (lp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_leading_dims_and_no_grad_path():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(50, 8, generator=g)
    t = torch.randint(0, 50, (2, 5), generator=g)
    lp, ent = linear_logprob_entropy(h, w, t)
    assert lp.shape == (2, 5) and ent.shape == (2, 5)
    lp1, none = linear_logprob_entropy(h, w, t, return_entropy=False)
    assert none is None
    torch.testing.assert_close(lp1, lp, rtol=0, atol=0)


def test_never_materialises_full_logits():
    """No storage of N*V elements (or half of it) anywhere in forward + backward."""
    N, H, V = 96, 16, 4099
    g = torch.Generator().manual_seed(2)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = torch.randn(V, H, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    with NewStorageTracker() as tr:
        lp, ent = linear_logprob_entropy(h, w, t, bias=b, chunk_tokens=8)
        (lp.sum() + ent.sum()).backward()
    assert max(tr.sizes) <= max(V * H, 8 * V), max(tr.sizes)  # dW itself, or one chunk of logits
    assert not [s for s in tr.sizes if s >= N * V // 2]


def test_chunk_budget():
    # 384 MiB of fp32 logits at V=151936 is 662 tokens
    assert chunk_tokens_for(4096, 151936, torch.float32, torch.device("cpu")) == 662
    assert chunk_tokens_for(10, 151936, torch.float32, torch.device("cpu")) == 10
    assert chunk_tokens_for(4096, 151936, torch.float32, torch.device("cpu"), chunk_tokens=7) == 7


def test_input_validation():
    with pytest.raises(ValueError):
        linear_logprob_entropy(torch.randn(3, 4), torch.randn(10, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        w64 = torch.randn(10, 4, dtype=torch.float64)
        linear_logprob_entropy(torch.randn(3, 4), w64, torch.zeros(3, dtype=torch.long))
