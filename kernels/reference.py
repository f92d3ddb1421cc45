"""Plain PyTorch references for every fused op, shared by the tests and the benchmarks.

These are the "forward_native" of each op (as vLLM keeps beside its custom ops): the
straightforward code a reader can check against the math in shared/design/kernels.md, with
autograd doing the backward. They materialise everything ([N, V] logits, probabilities, ...), so
they are the *eager baseline* in benchmarks/bench_kernels.py and, run in float64 on the same
low-precision inputs, the ground truth in tests/kernels/.

Conventions (the same as the fused ops):
- a target outside [0, V) (conventionally -100) masks its row: logp = entropy = 0, no gradient;
- `compute_dtype` is the dtype the softmax runs in (the fused ops always use fp32; the tests pass
  float64 to get the reference, or the input dtype to get "what PyTorch does in that dtype").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logprob_entropy_ref(logits, targets, *, temperature=1.0, return_entropy=True, compute_dtype=None):
    """log_softmax(logits / T)[target] and the softmax entropy, by the book."""
    V = logits.shape[-1]
    z = logits.to(compute_dtype or torch.float32) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = (targets >= 0) & (targets < V)
    logp = logsm.gather(-1, targets.clamp(0, V - 1).long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp, None
    p = logsm.exp()
    # p * log p is 0 * -inf = NaN where a logit is -inf; its limit is 0. Mask log p itself (not
    # the product) so the backward of the product never sees the -inf either.
    safe_logsm = torch.where(p > 0, logsm, torch.zeros_like(logsm))
    entropy = -(p * safe_logsm).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def linear_logprob_entropy_ref(
    hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=True, compute_dtype=None
):
    """The unfused LM head: full logits in the input dtype, then `logprob_entropy_ref`."""
    logits = F.linear(hidden, weight, bias)
    return logprob_entropy_ref(
        logits, targets, temperature=temperature, return_entropy=return_entropy, compute_dtype=compute_dtype
    )


def group_advantages_ref(rewards, group_ids, *, subgroup_ids=None, mode="grpo", eps=1e-6):
    """Loop over groups; unbiased std; a group of one gets advantage 0."""
    if mode not in ("grpo", "dr_grpo"):
        raise ValueError(f"unknown mode {mode!r}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    keys = [(int(g),) for g in group_ids.tolist()]
    if subgroup_ids is not None:
        keys = [k + (int(s),) for k, s in zip(keys, subgroup_ids.tolist())]
    adv = torch.zeros_like(r)
    for key in set(keys):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key], dtype=torch.long)
        rg = r[idx]
        if len(idx) == 1:
            continue  # singleton: no baseline to compare with
        centred = rg - rg.mean()
        if mode == "grpo":
            centred = centred / (rg.std(unbiased=True) + eps)
        adv[idx] = centred
    return adv


def clipped_policy_loss_ref(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    ref_logp=None,
    beta=0.0,
    agg="token-mean",
    normalizer=None,
):
    """Line-by-line PPO/GRPO clipped surrogate (+ beta * k3 KL), differentiable in `logp`."""
    ratio = torch.exp(logp - old_logp)
    A = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    A = A.to(ratio.dtype)
    surr1 = ratio * A
    surr2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * A
    per_token = -torch.minimum(surr1, surr2)
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0  # k3 estimator of KL(pi || pi_ref)
        per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    n_tok = m.sum().clamp(min=1.0)
    if agg == "token-mean":
        denom = n_tok if normalizer is None else normalizer
        loss = (per_token * m).sum() / denom
    elif agg == "seq-mean-token-mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        denom = per_seq.numel() if normalizer is None else normalizer
        loss = per_seq.sum() / denom
    else:
        raise ValueError(f"unknown agg {agg!r}")
    clipped = ((ratio < 1.0 - clip_low) & (A < 0)) | ((ratio > 1.0 + clip_high) & (A > 0))
    stats = {
        "clip_frac": (clipped.to(m.dtype) * m).sum() / n_tok,
        "ratio_mean": (ratio.detach() * m).sum() / n_tok,
        "kl_mean": (kl.detach() * m).sum() / n_tok if kl is not None else torch.zeros((), dtype=m.dtype),
    }
    return loss, stats


def grouped_policy_loss_ref(
    logp, old_logp, mask, rewards, group_ids, *, subgroup_ids=None, mode="grpo", eps=1e-6, **loss_kwargs
):
    adv = group_advantages_ref(rewards, group_ids, subgroup_ids=subgroup_ids, mode=mode, eps=eps)
    return clipped_policy_loss_ref(logp, old_logp, adv, mask, **loss_kwargs)


def swiglu_down_ref(gate, up, weight, bias=None):
    """Qwen3-VL's text MLP after its gate/up projections, as Hugging Face writes it:
    `down_proj(act_fn(gate) * up)` with act_fn = SiLU. Autograd saves gate, up, silu(gate) and the
    product; `axpo.kernels.swiglu_down` saves gate and up only."""
    return F.linear(F.silu(gate) * up, weight, bias)


def rms_norm_ref(x, weight, eps, *, compute_dtype=None):
    """Hugging Face's Qwen3-VL RMSNorm line by line: statistics in fp32 (`compute_dtype`; float64
    gives the ground truth), the normalised value cast back to the input dtype, then the weight."""
    xf = x.to(compute_dtype or torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
