"""Fused LM head: log-prob + entropy of `hidden @ weight.T (+ bias)` without `[N, V]` logits.

Both backends run the same host loop over *token* chunks (Liger's structure): per chunk, one GEMM
writes the chunk's logits into a reused workspace, then the row kernel of logprob_entropy.py
(Triton on CUDA, the chunked PyTorch path on CPU) reduces them. The backward recomputes the chunk's
logits, turns them into dlogits *in place* (the bwd row kernel reads and writes the same buffer),
and issues the two remaining GEMMs: dX_chunk = dlogits @ W and dW += dlogits.T @ X_chunk.
No GPU was available to tune a fused Triton GEMM + epilogue, so on CUDA the GEMMs are cuBLAS
(torch.mm) and only the softmax/entropy epilogue is Triton - said plainly so nobody assumes a
CUTLASS-class kernel here.

Cost: forward 1 GEMM (2NHV FLOPs), backward 3 (recompute, dX, dW): 4 GEMMs against the
3-GEMM floor of an unfused head that stores its logits. The extra GEMM is the price of never
holding `[N, V]`; benchmarks/bench_kernels.py reports the ratio to the floor.

Chunking trap (shared/design/kernels.md): each token chunk streams the whole weight, so chunks are
sized by a workspace budget in bytes, not by V or H; dW is accumulated once, in fp32 for
low-precision weights, without any per-chunk `[V, H]` temporary (Liger allocates one per chunk).
Under FSDP2 the caller all-gathers the LM head once per micro-batch and passes the full weight;
this op never gathers anything itself.
"""

from __future__ import annotations

import os

import torch

from .dispatch import backend_for
from .logprob_entropy import lpe_backward, lpe_forward

# Workspace for one logits chunk. CPU: 384 MiB, i.e. 662 tokens at V=151936 fp32. Measured on the
# 2-core bench machine (N=4096, H=1024, V=151936 fp32, head + loss fwd+bwd): 441 tokens (256 MiB)
# 16.8-16.9 s, 640 tokens 15.9-16.4 s, 1024 tokens 15.1-15.5 s; bigger chunks run the GEMMs
# faster (fewer dW read-modify-writes, better blocking) but 1024 tokens puts the peak at Liger's
# (~1.25 GiB with the 593 MiB dW), so 384 MiB keeps most of the gain at ~1 GiB.
# CUDA: 1 GiB, i.e. >= 2K tokens of a 150K vocabulary in bf16, large enough that re-streaming the
# weight per chunk stays far below the GEMM time.
_DEFAULT_WORKSPACE_MIB = {"cpu": 384, "cuda": 1024}


def chunk_tokens_for(n_tokens, vocab, dtype, device, chunk_tokens=None):
    if chunk_tokens is None:
        env = os.environ.get("AXPO_LM_HEAD_WORKSPACE_MB")
        mib = float(env) if env else _DEFAULT_WORKSPACE_MIB.get(device.type, 384)
        elem = torch.empty((), dtype=dtype).element_size()
        chunk_tokens = int(mib * 2**20) // max(1, vocab * elem)
    return max(1, min(int(chunk_tokens), max(1, n_tokens)))


def _logits_chunk(x, weight, bias, out):
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _forward(hidden, weight, bias, targets, inv_t, want_ent, chunk, backend):
    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    ent = torch.empty(N, device=dev, dtype=torch.float32) if want_ent else None
    state = torch.empty(3, N, device=dev, dtype=torch.float32)  # per-row softmax state, see lpe_forward
    ws = torch.empty(min(chunk, max(N, 1)), V, device=dev, dtype=hidden.dtype)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        buf = _logits_chunk(hidden[c0:c1], weight, bias, ws[: c1 - c0])
        lp, en, st = lpe_forward(buf.unsqueeze(0), targets[c0:c1], inv_t, want_ent, backend)
        logp[c0:c1] = lp
        state[:, c0:c1] = st
        if want_ent:
            ent[c0:c1] = en
    return logp, ent, state


def _mm_acc(acc, a, b, first):
    """acc (+)= a @ b with acc in fp32, without a [V, H]-sized temporary where possible."""
    if a.dtype == acc.dtype:
        if first:
            return torch.mm(a, b, out=acc)
        return acc.addmm_(a, b)
    if a.is_cuda:
        try:  # bf16/fp16 tensor-core GEMM with an fp32 result (torch >= 2.8 on CUDA)
            return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    # CPU low precision: upcast the (workspace-sized) chunk operands, accumulate exactly in fp32.
    if first:
        return torch.mm(a.float(), b.float(), out=acc)
    return acc.addmm_(a.float(), b.float())


class LinearLogprobEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, chunk, backend):
        inv_t = 1.0 / temperature
        logp, ent, state = _forward(hidden, weight, bias, targets, inv_t, return_entropy, chunk, backend)
        ctx.save_for_backward(hidden, weight, bias, targets, state)
        ctx.inv_t, ctx.has_ent, ctx.chunk, ctx.backend = inv_t, return_entropy, chunk, backend
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, bias, targets, state = ctx.saved_tensors
        if not ctx.has_ent:
            g_ent = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if (g_lp is None and g_ent is None) or not (need_x or need_w or need_b):
            return (None,) * 8
        N, H = hidden.shape
        V = weight.shape[0]
        dev, dt = hidden.device, hidden.dtype
        chunk = ctx.chunk
        n_chunks = -(-N // chunk)
        dx = torch.empty(N, H, device=dev, dtype=dt) if need_x else None
        # One chunk: dW in the weight dtype straight from one GEMM, as the unfused head does.
        # Several: accumulate in fp32 once and round at the end.
        acc_dt = torch.float32 if n_chunks > 1 else weight.dtype
        dw = torch.empty(V, H, device=dev, dtype=acc_dt) if need_w else None
        db = torch.zeros(V, device=dev, dtype=torch.float32) if (need_b and bias is not None) else None
        ws = torch.empty(min(chunk, N), V, device=dev, dtype=dt)
        for i, c0 in enumerate(range(0, N, chunk)):
            c1 = min(N, c0 + chunk)
            x = hidden[c0:c1]
            buf = _logits_chunk(x, weight, bias, ws[: c1 - c0])
            lpe_backward(
                buf.unsqueeze(0),
                targets[c0:c1],
                state[:, c0:c1].contiguous(),
                g_lp[c0:c1] if g_lp is not None else None,
                g_ent[c0:c1] if g_ent is not None else None,
                ctx.inv_t,
                buf,  # in place: the logits chunk becomes dlogits
                ctx.backend,
            )
            if need_x:
                torch.mm(buf, weight, out=dx[c0:c1])
            if need_w:
                _mm_acc(dw, buf.t(), x, first=i == 0)
            if db is not None:
                db.add_(buf.sum(0, dtype=torch.float32))
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if db is not None:
            db = db.to(bias.dtype)
        return dx, dw, db, None, None, None, None, None


def linear_logprob_entropy(
    hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=True, chunk_tokens=None
):
    """`logprob_entropy(hidden @ weight.T + bias, targets)` without ever building `[N, V]` logits.

    Args:
        hidden: `[..., H]`; weight: `[V, H]`; bias: `[V]` or None (all the same float dtype).
        targets: `[...]` integer ids; outside `[0, V)` (e.g. -100) masks the row (zero outputs,
            exactly zero gradient contribution).
        temperature: applied in fp32 to the logits after the GEMM.
        return_entropy: if False, entropy is neither computed nor returned (None).
        chunk_tokens: tokens per chunk; default from a workspace budget (384 MiB on CPU, 1 GiB on
            CUDA; `AXPO_LM_HEAD_WORKSPACE_MB` overrides).

    Returns:
        `(logp, entropy)`, fp32 `[...]`, differentiable with respect to hidden, weight and bias.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("hidden, weight and bias must share one dtype")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    lead = targets.shape
    H = hidden.shape[-1]
    V = weight.shape[0]
    x = hidden.reshape(-1, H)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = targets.reshape(-1)
    chunk = chunk_tokens_for(x.shape[0], V, x.dtype, x.device, chunk_tokens)
    backend = backend_for(hidden, weight)
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not grad:  # no-grad fast path (old-policy / reference log-probs): nothing saved
        logp, ent, _ = _forward(x, weight, bias, t, 1.0 / temperature, return_entropy, chunk, backend)
        return logp.view(lead), (ent.view(lead) if ent is not None else None)
    out = LinearLogprobEntropyFunction.apply(
        x, weight, bias, t, float(temperature), bool(return_entropy), chunk, backend
    )
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead), None
