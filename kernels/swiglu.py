"""SwiGLU down projection for training: `down_proj(silu(gate) * up)` saving only gate and up.

The unfused expression (`reference.swiglu_down_ref`, Qwen3-VL's text MLP) keeps four [N, I]
activations alive until backward: gate and up (for the product), silu(gate) (for d up) and the
product h (down_proj's input, for its weight gradient). This op saves gate, up and the weight and
recomputes h = silu(gate) * up in backward, where the weight gradient needs it: half the MLP's
saved activations, for one extra elementwise pass over [N, I] per backward.

Same math, same rounding: the forward runs the very ops of the unfused expression in the input
dtype (so its output is bit-identical), and the recomputed h is bit-identical to the forward's,
so the gradients are the ones autograd computes for the expression (up to GEMM summation order).

Plain PyTorch (a `torch.autograd.Function`, no custom op): every step is an aten op, so it runs on
any device and dtype, traces under FakeTensorMode, and torch.compile captures its forward and
backward as they are. Without autograd (no_grad, inference mode, nothing requiring grad) the
plain expression runs, as nothing is saved there anyway; under autocast too, whose casts the
hand-written backward would not mirror.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import swiglu_down_ref


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        out = F.linear(F.silu(gate) * up, weight, bias)
        ctx.save_for_backward(gate, up, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every [N, I] temporary is reused in place once it is dead, so backward holds at most three
        # beside the saved gate and up (two of them are the returned gradients), as the unfused
        # expression's backward does: saving less must not cost a higher peak here instead.
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_w, need_b = ctx.needs_input_grad
        I, O = gate.shape[-1], grad.shape[-1]
        g2 = grad.reshape(-1, O)
        d_gate = d_up = d_w = d_b = None
        if need_b:
            d_b = g2.sum(0)
        if not (need_w or need_gate or need_up):
            return d_gate, d_up, d_w, d_b
        s = F.silu(gate)   # recomputed exactly as in forward
        if need_w:
            h = s * up
            d_w = g2.t().mm(h.reshape(-1, I))
            del h
        if need_gate or need_up:
            d_h = grad.matmul(weight)
            if need_up:
                d_up = s.mul_(d_h)   # s is dead after this
            del s
            if need_gate:
                # silu_backward is the kernel autograd runs for F.silu (the same dsilu rounding);
                # elementwise, so it may write over its own gradient input.
                d_h.mul_(up)
                d_gate = torch.ops.aten.silu_backward.grad_input(d_h, gate, grad_input=d_h)
        return d_gate, d_up, d_w, d_b


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(F.silu(gate) * up, weight, bias)` (gate, up: [..., I]; weight: [O, I]) saving
    only gate, up and weight for backward (module docstring)."""
    if (not torch.is_grad_enabled() or torch.is_autocast_enabled(gate.device.type)
            or not any(t is not None and t.requires_grad for t in (gate, up, weight, bias))):
        # Autocast would cast inside forward only (backward runs outside it): leave it to autograd.
        return swiglu_down_ref(gate, up, weight, bias)
    return _SwiGLUDown.apply(gate, up, weight, bias)
