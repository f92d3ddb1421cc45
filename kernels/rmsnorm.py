"""RMSNorm for training that saves the input and the per-row rstd, not the normalised value.

Hugging Face's Qwen3-VL RMSNorm (`reference.rms_norm_ref`) is

    xf = x.float(); rstd = rsqrt(mean(xf^2, -1) + eps); y = weight * (xf * rstd).to(x.dtype)

and autograd keeps xf (an fp32 copy when x is bf16), rstd and the normalised [..., H] value for
the weight's gradient: two full-size activations per norm. This op saves x (in its own dtype),
rstd ([..., 1], fp32) and the weight, and recomputes the normalised value in backward from the
saved rstd (bit-identical to the forward's).

The forward runs HF's ops in HF's order (fp32 statistics, cast back to the input dtype before the
weight, the output dtype promoted from the weight's and the input's), so its output equals the
module's bit for bit. Backward works in fp32 and rounds once at the end:
    n = xf * rstd;  dn = dy * weight;  dx = rstd * (dn - n * mean(dn * n));  dweight = sum(dy * n).

Plain PyTorch (a `torch.autograd.Function`), as `swiglu.py`: any device and dtype, FakeTensor- and
torch.compile-traceable; without autograd, or under autocast, the plain expression runs.
"""

from __future__ import annotations

import torch

from .reference import rms_norm_ref


def _stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in fp32, rstd [..., 1]) by HF's ops: pow(2).mean, then rsqrt(var + eps)."""
    xf = x.to(torch.float32)
    return xf, torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf, rstd = _stats(x, eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        # Dead temporaries are overwritten in place: backward holds about two full-size fp32 tensors.
        x, rstd, weight = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        H = x.shape[-1]
        gf = grad.to(torch.float32)
        n = x.to(torch.float32) * rstd   # the forward's normalised value, exactly
        d_x = d_w = None
        if need_w:
            # The weight multiplied the normalised value rounded to x's dtype: that is its gradient.
            n_x = n if x.dtype == torch.float32 else n.to(x.dtype).to(torch.float32)
            d_w = (gf * n_x).reshape(-1, H).sum(0).to(weight.dtype)
            del n_x
        if need_x:
            dn = gf * weight.to(torch.float32)
            proj = (dn * n).mean(-1, keepdim=True)
            d_x = dn.sub_(n.mul_(proj)).mul_(rstd).to(x.dtype)
        return d_x, d_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-VL's RMSNorm, `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`,
    saving only x, the per-row rstd and the weight for backward (module docstring)."""
    if (not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)
            or not (x.requires_grad or weight.requires_grad)):
        # (Autocast: see swiglu.py.) The same ops as the forward below, with nothing to save.
        return rms_norm_ref(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
