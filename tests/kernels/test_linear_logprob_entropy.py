"""linear_logprob_entropy (fused LM head) on the PyTorch path against the float64 reference."""

import importlib

import pytest
import torch
from kernels_testlib import NewStorageTracker, check_linear
from torch._subclasses.fake_tensor import FakeTensorMode

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


# -------------------------------------------------------------------------------------------------
# Multi-chunk dW accumulation in every code path of mm_acc (issue #19)
# -------------------------------------------------------------------------------------------------

lle = importlib.import_module("axpo.kernels.linear_logprob_entropy")
dispatch = importlib.import_module("axpo.kernels.dispatch")


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the ops allocate with dispatch.empty starts as NaN: stale memory shows."""
    monkeypatch.setattr(dispatch, "POISON_EMPTY", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multichunk_backward_small_workspace(dtype, poison, monkeypatch):
    """Default chunking from a tiny workspace budget: 37 tokens x V=1031 in 16 KiB chunks (3 tokens
    in fp32, 7 in bf16) -> 13 or 6 chunks; dW accumulated across all of them."""
    monkeypatch.setenv("AXPO_LM_HEAD_WORKSPACE_MB", str(16 / 1024))
    assert lle.chunk_tokens_for(37, 1031, dtype, torch.device("cpu")) == (3 if dtype == torch.float32 else 7)
    check_linear(37, 24, 1031, dtype, bias=True, temperature=0.7, grad_mode="both", chunk_tokens=None,
                 masked_rows=(5,))


def test_acc_path_selection():
    f32, bf = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16)
    assert lle.acc_path(f32, f32) == "native"
    assert lle.acc_path(f32, bf) == "upcast"  # CPU low precision
    with FakeTensorMode():
        acc = torch.empty(2, 2, device="cuda")
        assert lle.acc_path(acc, torch.empty(2, 2, device="cuda", dtype=torch.bfloat16)) == "out_dtype"
        assert lle.acc_path(acc, torch.empty(2, 2, device="cuda")) == "native"


def _emulate_out_dtype(monkeypatch, log, addmm_fails=False):
    """Run mm_acc's CUDA branch ("out_dtype") on CPU tensors: the branch logic (first chunk writes,
    later chunks accumulate, the fallback) executes for real; only the bf16 x bf16 -> fp32 GEMM
    itself, which CPU torch lacks, is emulated by an exact fp32 GEMM of the upcast operands."""
    monkeypatch.setattr(lle, "_OUT_DTYPE_OK", {"mm": True, "addmm": True})
    monkeypatch.setattr(lle, "acc_path", lambda acc, a: "native" if a.dtype == acc.dtype else "out_dtype")

    def mm_out(a, b, out):
        log.append("mm_out")
        assert out.dtype == torch.float32 and a.dtype == torch.bfloat16
        return torch.mm(a.float(), b.float(), out=out)

    def addmm_(acc, a, b):
        log.append("addmm_out")
        if addmm_fails:
            raise RuntimeError("self and mat2 must have the same dtype")  # torch < 2.9 on CUDA
        return acc.addmm_(a.float(), b.float())

    def mm(a, b):
        log.append("mm+add")
        return torch.mm(a.float(), b.float())

    monkeypatch.setattr(lle, "_mm_f32out", mm_out)
    monkeypatch.setattr(lle, "_addmm_f32out_", addmm_)
    monkeypatch.setattr(lle, "_mm_f32", mm)


@pytest.mark.parametrize("addmm_fails", [False, True])
def test_cuda_out_dtype_branch_multichunk_on_cpu(addmm_fails, poison, monkeypatch):
    """The bug of issue #19: this branch ignored `first` and added into `torch.empty` memory."""
    log = []
    _emulate_out_dtype(monkeypatch, log, addmm_fails)
    check_linear(29, 16, 517, torch.bfloat16, bias=True, temperature=1.5, grad_mode="both", chunk_tokens=4,
                 masked_rows=(3,))
    n_chunks = -(-29 // 4)
    later = ["addmm_out"] if not addmm_fails else ["addmm_out", "mm+add"] + ["mm+add"] * (n_chunks - 2)
    assert log[0] == "mm_out" and log.count("mm_out") == 1
    if not addmm_fails:
        assert log[1:] == ["addmm_out"] * (n_chunks - 1)
    else:  # the failing addmm is tried once, then the fallback is remembered
        assert log[1:] == later and lle._OUT_DTYPE_OK["addmm"] is False


def test_mm_acc_first_chunk_never_reads_acc():
    for a_dt in (torch.float32, torch.bfloat16):
        a = torch.randn(5, 3).to(a_dt)
        b = torch.randn(3, 4).to(a_dt)
        acc = torch.full((5, 4), float("nan"))
        lle.mm_acc(acc, a, b, first=True)
        torch.testing.assert_close(acc, a.float() @ b.float())
        lle.mm_acc(acc, a, b, first=False)
        torch.testing.assert_close(acc, 2 * (a.float() @ b.float()))


def test_cuda_backward_loop_under_fake_tensors(monkeypatch):
    """The real host loop of the backward (what runs inside the custom op on a GPU), executed on
    fake CUDA bf16 tensors: 3 chunks; the first writes dW through mm(out_dtype=fp32, out=dW),
    the later ones accumulate. Fake tensors carry no values, so this checks the path taken, the
    dtypes and the shapes, not numbers (the numbers are checked on CPU above)."""
    calls = []
    monkeypatch.setattr(lle, "_OUT_DTYPE_OK", {"mm": True, "addmm": True})
    real = {k: getattr(lle, k) for k in ("_mm_f32out", "_addmm_f32out_", "_mm_f32")}
    for k, fn in real.items():
        monkeypatch.setattr(lle, k, lambda *a, _k=k, _fn=fn: (calls.append(_k), _fn(*a))[1])
    N, H, V = 7, 16, 301
    with FakeTensorMode():
        d = dict(device="cuda", dtype=torch.bfloat16)
        h, w = torch.empty(N, H, **d), torch.empty(V, H, **d)
        t = torch.empty(N, device="cuda", dtype=torch.long)
        st = torch.empty(3, N, device="cuda")
        g = torch.empty(N, device="cuda")
        dx, dw, db = lle._backward(h, w, None, t, st, g, g, 1.0, 3, True, True, False)
        assert dx.shape == (N, H) and dx.dtype == torch.bfloat16 and dx.device.type == "cuda"
        assert dw.shape == (V, H) and dw.dtype == torch.bfloat16 and dw.device.type == "cuda"
    assert calls[0] == "_mm_f32out" and calls.count("_mm_f32out") == 1
    # later chunks: addmm(out_dtype) (on a CPU-only build its fake kernel raises, so the loop
    # falls back to mm(out_dtype) + add_ as it would on a torch whose addmm.dtype_out is strict)
    assert set(calls[1:]) <= {"_addmm_f32out_", "_mm_f32"} and len(calls) >= 3
