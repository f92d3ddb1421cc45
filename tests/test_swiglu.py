"""`axpo.kernels.swiglu_down`: the unfused expression's values and gradients, fewer saved tensors.

The kernels' rule (tests/kernels/kernels_testlib.py): against a float64 reference computed from
the same inputs, ours is no worse than PyTorch's own expression in the input dtype.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from axpo.kernels import swiglu_down
from axpo.kernels.reference import swiglu_down_ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
from kernels_testlib import assert_no_worse  # noqa: E402


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _inputs(shape, I, O, dtype, bias, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(*shape, I, generator=g) * 2).to(device, dtype)
    up = torch.randn(*shape, I, generator=g).to(device, dtype)
    w = (torch.randn(O, I, generator=g) / I ** 0.5).to(device, dtype)
    b = torch.randn(O, generator=g).to(device, dtype) if bias else None
    dy = torch.randn(*shape, O, generator=g).to(device, dtype)
    return gate, up, w, b, dy


def _run(fn, gate, up, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (gate, up, w, b)]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,I,O,bias", [((3, 7), 37, 13, False), ((11,), 96, 40, True),
                                           ((2, 5, 3), 17, 9, True)])
def test_matches_unfused_against_fp64(shape, I, O, bias, dtype, device):
    gate, up, w, b, dy = _inputs(shape, I, O, dtype, bias, device=device)
    ours = _run(swiglu_down, gate, up, w, b, dy)
    same = _run(swiglu_down_ref, gate, up, w, b, dy)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    ref64 = _run(swiglu_down_ref, d(gate), d(up), d(w), d(b), d(dy))
    # The forward is the expression's own ops: bit-identical.
    assert ours[0].dtype == dtype and torch.equal(ours[0], same[0])
    for name, o, r, s in zip(["out", "dgate", "dup", "dweight", "dbias"], ours, ref64, same):
        assert o.dtype == dtype and o.shape == s.shape
        assert_no_worse(o, r, s, dtype, name)


def test_saves_gate_and_up_only():
    gate, up, w, _, dy = _inputs((4, 6), 24, 8, torch.float32, False)
    gate, up, w = (t.requires_grad_() for t in (gate, up, w))

    def saved(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fn(gate, up, w)
        return sum(t.numel() for t in kept)

    n_act = gate.numel()
    assert saved(swiglu_down) == 2 * n_act + w.numel()
    assert saved(swiglu_down_ref) >= 4 * n_act   # gate, up, silu(gate), the product


def test_partial_gradients_and_no_grad():
    gate, up, w, b, dy = _inputs((5,), 12, 6, torch.float32, True)
    # Only the weight trains (frozen activations' producers): no activation gradient is formed.
    wq = w.clone().requires_grad_()
    swiglu_down(gate, up, wq, b).backward(dy)
    wr = w.clone().requires_grad_()
    swiglu_down_ref(gate, up, wr, b).backward(dy)
    torch.testing.assert_close(wq.grad, wr.grad)
    # Only gate needs a gradient.
    gq = gate.clone().requires_grad_()
    swiglu_down(gq, up, w, b).backward(dy)
    gr = gate.clone().requires_grad_()
    swiglu_down_ref(gr, up, w, b).backward(dy)
    torch.testing.assert_close(gq.grad, gr.grad)
    # no_grad / inference mode: the plain expression, no graph.
    p = [t.clone().requires_grad_() for t in (gate, up, w)]
    with torch.no_grad():
        out = swiglu_down(*p, b)
    assert out.grad_fn is None and torch.equal(out, swiglu_down_ref(gate, up, w, b))
    with torch.inference_mode():
        assert torch.equal(swiglu_down(gate, up, w, b), swiglu_down_ref(gate, up, w, b))
    # Autocast casts in forward only: the plain expression (autograd's own backward) runs.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swiglu_down(*p, b)
        assert out.dtype == torch.bfloat16 and torch.equal(out, swiglu_down_ref(*p, b))
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in p)


def test_traces_under_fake_tensors_with_backward():
    with FakeTensorMode():
        gate = torch.empty(2, 3, 16, dtype=torch.bfloat16, requires_grad=True)
        up = torch.empty(2, 3, 16, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(8, 16, dtype=torch.bfloat16, requires_grad=True)
        out = swiglu_down(gate, up, w)
        assert out.shape == (2, 3, 8) and out.dtype == torch.bfloat16
        out.sum().backward()
        assert gate.grad.shape == gate.shape and w.grad.shape == w.shape


def test_inside_activation_checkpoint():
    """A checkpointed layer re-runs the op's forward in backward: same gradients as without."""
    from torch.utils.checkpoint import checkpoint

    gate, up, w, b, dy = _inputs((3, 4), 20, 7, torch.float32, True)
    x = torch.randn(3, 4, 20, requires_grad=True)
    lin = torch.nn.Linear(20, 20)

    def f(x):
        return swiglu_down(lin(x) * gate, F.silu(x) + up, w, b)

    f(x).backward(dy)
    g1, gw1 = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.weight.grad = None
    checkpoint(f, x, use_reentrant=False).backward(dy)
    torch.testing.assert_close(x.grad, g1, rtol=0, atol=0)
    torch.testing.assert_close(lin.weight.grad, gw1, rtol=0, atol=0)
