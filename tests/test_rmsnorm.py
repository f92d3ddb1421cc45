"""`axpo.kernels.rms_norm`: Hugging Face's Qwen3-VL RMSNorm, bit for bit forward, gradients no worse
than PyTorch's own against a float64 reference, and one full-size saved tensor instead of two."""

import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

from axpo.kernels import rms_norm
from axpo.kernels.reference import rms_norm_ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
from kernels_testlib import assert_no_worse  # noqa: E402

EPS = 1e-6
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _inputs(shape, x_dtype, w_dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3 + 0.5).to(device, x_dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device, w_dtype)
    return x, w


def _run(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 7, 3, 32), (1, 1)])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_hf_module_and_fp64(shape, x_dtype, w_dtype, device):
    x, w = _inputs(shape, x_dtype, w_dtype, device=device)
    mod = Qwen3VLTextRMSNorm(shape[-1], eps=EPS).to(device, w_dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, out_dtype)
    ours = _run(lambda a, b: rms_norm(a, b, EPS), x, w, dy)
    same = _run(lambda a, b: rms_norm_ref(a, b, EPS), x, w, dy)
    ref64 = _run(lambda a, b: rms_norm_ref(a, b, EPS, compute_dtype=torch.float64), x.double(), w.double(), dy)
    # Forward: the module's own value, bit for bit (and the reference is the module's code).
    assert ours[0].dtype == out_dtype
    assert torch.equal(ours[0], mod(x)) and torch.equal(same[0], mod(x))
    for name, o, r, s in zip(["y", "dx", "dweight"], ours, ref64, same):
        assert o.dtype == s.dtype and o.shape == s.shape
        assert_no_worse(o, r, s, x_dtype, name)


def test_saves_input_and_rstd_only():
    x, w = _inputs((6, 4, 16), torch.bfloat16, torch.bfloat16)
    x.requires_grad_()
    w.requires_grad_()

    def saved(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fn(x, w)
        return sum(t.numel() * t.element_size() for t in kept)

    ours = saved(lambda a, b: rms_norm(a, b, EPS))
    assert ours == x.numel() * 2 + 6 * 4 * 4 + w.numel() * 2     # x (bf16), rstd (fp32), weight
    assert saved(lambda a, b: rms_norm_ref(a, b, EPS)) >= x.numel() * (4 + 2)   # fp32 copy + normalised


def test_partial_gradients_and_no_grad():
    x, w = _inputs((4, 9), torch.float32, torch.float32)
    dy = torch.randn(4, 9)
    for need_x, need_w in ((True, False), (False, True)):
        xs = [x.clone().requires_grad_(need_x) for _ in range(2)]
        ws = [w.clone().requires_grad_(need_w) for _ in range(2)]
        rms_norm(xs[0], ws[0], EPS).backward(dy)
        rms_norm_ref(xs[1], ws[1], EPS).backward(dy)
        a, b = (xs[0].grad, xs[1].grad) if need_x else (ws[0].grad, ws[1].grad)
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        y = rms_norm(x.requires_grad_(), w, EPS)
    assert y.grad_fn is None and torch.equal(y, rms_norm_ref(x, w, EPS))
    with torch.inference_mode():
        assert torch.equal(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))


def test_traces_under_fake_tensors_with_backward():
    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 32, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(32, dtype=torch.bfloat16, requires_grad=True)
        y = rms_norm(x, w, EPS)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape
