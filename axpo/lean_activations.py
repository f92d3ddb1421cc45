"""Swap the text decoder's MLPs and RMSNorms for forwards that save fewer activations for backward.

Same math (`axpo.kernels.swiglu_down`, `axpo.kernels.rms_norm`: the HF modules' values bit for
bit, gradients as accurate as autograd's); what changes is what autograd keeps until backward: the MLP saves
gate and up instead of gate, up, silu(gate) and their product, a norm saves its input and per-row
rstd instead of its input (an fp32 copy under bf16) and the normalised value. On the RL benchmark
step (benchmarks/bench_trainer.py: 64 rows x 64 tokens, tiny model) the saved activations fall
from 233 MB to 151 MB.

Only each module's `forward` is replaced, on the instance: the modules, their Parameters and
their state-dict names stay where they are, and the new forwards read `self.<proj>.weight` when
called. So FSDP2 (a decoder layer is one unit: its pre-forward hook swaps the sharded parameters
for the all-gathered ones on these very modules, and its post-backward reduce-scatters their
gradients), activation checkpointing (it re-runs the layer's forward) and deepcopy (a bound
method is rebound to the copy) work as with the HF forward. Only modules of exactly the HF
classes are touched (a subclass or another model may compute something else); the vision tower
is left as it is.
"""

from __future__ import annotations

import types

from torch import nn

from axpo.kernels import rms_norm, swiglu_down


def _swiglu_mlp_forward(self, x):
    # Qwen3VLTextMLP.forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)); the projections into
    # the intermediate size stay nn.Linear calls (their saved input is the layer's normed x).
    return swiglu_down(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def install_lean_activations(hf_model: nn.Module) -> int:
    """Give the text decoder's SiLU MLPs and RMSNorms (layer norms, q/k norms, the final norm) of
    `hf_model` (a Qwen3-VL model) the lean forwards; returns how many modules were changed.
    Calling it again changes nothing more."""
    from transformers.activations import SiLUActivation
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextMLP, Qwen3VLTextRMSNorm

    text = getattr(getattr(hf_model, "model", None), "language_model", None)
    if text is None:
        return 0
    n = 0
    for m in text.modules():
        if type(m) is Qwen3VLTextMLP and type(m.act_fn) in (SiLUActivation, nn.SiLU):
            fn = _swiglu_mlp_forward
        elif type(m) is Qwen3VLTextRMSNorm:
            fn = _rms_norm_forward
        else:
            continue
        # Instance attribute: nn.Module.__call__ looks up self.forward, which finds it first.
        m.forward = types.MethodType(fn, m)
        n += 1
    return n
