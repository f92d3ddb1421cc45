"""logprob_entropy on the PyTorch path (CPU) against the float64 reference.

The Triton kernels run the same checks through the interpreter in test_triton_interpret.py.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_testlib import NewStorageTracker, check_logprob_entropy, make_logits, pick_targets

from axpo.kernels import logprob_entropy


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,N", [(123, 289), (517, 7), (2053, 33), (151936, 3)])
def test_shapes_dtypes(V, N, dtype):
    x = make_logits(N, V, dtype)
    check_logprob_entropy(x, pick_targets((N,), V, "randn"), 1.0, "both", masked_rows=(1,) if N > 1 else ())


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
@pytest.mark.parametrize("grad_mode", ["logp", "entropy", "both"])
def test_grad_paths_and_temperatures(temperature, grad_mode):
    x = make_logits(12, 2053, torch.bfloat16, seed=3)
    check_logprob_entropy(x, pick_targets((12,), 2053, "randn"), temperature, grad_mode, masked_rows=(0, 5))


@pytest.mark.parametrize("kind,dtype", [("tiles", torch.float32), ("tiles", torch.bfloat16),
                                        ("neginf", torch.float32), ("neginf", torch.bfloat16),
                                        ("negative", torch.float32), ("fp16max", torch.float16)])
def test_adversarial_values(kind, dtype):
    V = 2053
    x = make_logits(9, V, dtype, kind=kind)
    check_logprob_entropy(x, pick_targets((9,), V, kind), 0.7, "both", masked_rows=(4,))


@pytest.mark.parametrize("V", [517, 151936])
def test_strided_shifted_view(V):
    """logits[:, :-1] of [B, T, V]: two row strides, no copy."""
    x = make_logits(8, V, torch.bfloat16, shifted=True)
    assert not x.is_contiguous()
    check_logprob_entropy(x, pick_targets(x.shape[:-1], V, "randn"), 1.5, "both", masked_rows=(2,))


def test_column_strided_and_1d():
    x = make_logits(5, 300, torch.float32)
    xt = x.t().contiguous().t()  # column stride != 1 -> copied, still correct
    check_logprob_entropy(xt, pick_targets((5,), 300, "randn"), 1.0, "both")
    lp, ent = logprob_entropy(x[0], torch.tensor(3))
    assert lp.shape == () and ent.shape == ()


def test_all_neginf_but_target_and_garbage_masked_row():
    V = 777
    x = torch.full((3, V), float("-inf"))
    x[0, 5] = 2.0  # only the target is finite: logp = 0, entropy = 0
    x[1] = torch.randn(V)
    x[2] = float("nan")  # garbage in a masked row must not leak
    t = torch.tensor([5, 9, -100])
    xg = x.clone().requires_grad_()
    lp, ent = logprob_entropy(xg, t)
    (lp.sum() + ent.sum()).backward()
    assert lp[0] == 0 and ent[0] == 0 and lp[2] == 0 and ent[2] == 0
    assert torch.isfinite(xg.grad).all()
    assert (xg.grad[0] == 0).all() and (xg.grad[2] == 0).all()


def test_shift_invariance():
    x = make_logits(6, 1000, torch.float32, seed=4, scale=1.0)
    t = pick_targets((6,), 1000, "randn")
    a = logprob_entropy(x, t)
    b = logprob_entropy(x + 50.0, t)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=2e-5)


def test_no_nv_temporary_besides_gradient():
    """Forward + backward create exactly one new [N, V]-sized storage: the gradient.

    (N is well above the ~64 rows the CPU path's fixed ~1 MiB scratch holds at this V.)
    """
    N, V = 512, 4099
    x = make_logits(N, V, torch.float32).requires_grad_()
    t = pick_targets((N,), V, "randn")
    with NewStorageTracker() as tr:
        lp, ent = logprob_entropy(x, t)
        (lp.sum() + ent.sum()).backward()
    big = [s for s in tr.sizes if s >= N * V // 2]
    assert len(big) == 1, big


def test_input_validation():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError):
        logprob_entropy(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        logprob_entropy(x, torch.zeros(4))
    lp, ent = logprob_entropy(x, torch.zeros(4, dtype=torch.long), return_entropy=False)
    assert ent is None


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(2, 700),
    temp=st.sampled_from([0.5, 1.0, 2.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(n, v, temp, dtype, seed):
    x = make_logits(n, v, dtype, seed=seed)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    check_logprob_entropy(x, t, temp, "both", masked_rows=(n - 1,) if n > 2 else ())
