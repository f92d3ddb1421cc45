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
low-precision weights (`_mm_acc`: the first chunk *writes* the accumulator, later chunks add to
it, in every code path), without a per-chunk `[V, H]` temporary where torch allows it (Liger
allocates one per chunk).

The forward and backward are torch.library custom ops (`axpo::linear_logprob_entropy_fwd` /
`_bwd`) with fake implementations, so the head traces under FakeTensorMode and torch.compile.
When the loss is known at forward time, `linear_policy_loss.py` avoids the recompute GEMM.
Under FSDP2 the caller all-gathers the LM head once per micro-batch and passes the full weight;
this op never gathers anything itself.
"""

from __future__ import annotations

import os

import torch

from . import dispatch
from .dispatch import check_same_device, contiguous
from .logprob_entropy import logprob_entropy_bwd_inplace_op, logprob_entropy_fwd_op

# Workspace for one logits chunk. CPU: 384 MiB, i.e. 662 tokens at V=151936 fp32. Measured on the
# 2-core bench machine (N=4096, H=1024, V=151936 fp32, head + loss fwd+bwd): 441 tokens (256 MiB)
# 16.8-16.9 s, 640 tokens 15.9-16.4 s, 1024 tokens 15.1-15.5 s; bigger chunks run the GEMMs
# faster (fewer dW read-modify-writes, better blocking) but 1024 tokens puts the peak at Liger's
# (~1.25 GiB with the 593 MiB dW), so 384 MiB keeps most of the gain at ~1 GiB.
# CUDA: 1 GiB, i.e. >= 2K tokens of a 150K vocabulary in bf16, large enough that re-streaming the
# weight per chunk stays far below the GEMM time.
_DEFAULT_WORKSPACE_MIB = {"cpu": 384, "cuda": 1024}


def chunk_tokens_for(n_tokens, vocab, dtype, device, chunk_tokens=None, defaults=None):
    if chunk_tokens is None:
        env = os.environ.get("AXPO_LM_HEAD_WORKSPACE_MB")
        table = defaults or _DEFAULT_WORKSPACE_MIB
        mib = float(env) if env else table.get(device.type, table["cpu"])
        chunk_tokens = int(mib * 2**20) // max(1, vocab * dtype.itemsize)
    return max(1, min(int(chunk_tokens), max(1, n_tokens)))


def logits_chunk(x, weight, bias, out):
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


# -------------------------------------------------------------------------------------------------
# dW accumulation: acc (+)= a @ b with acc fp32
# -------------------------------------------------------------------------------------------------
# Three code paths, chosen by `acc_path` from the dtypes and the device:
#   "native"    a, b already in acc's dtype (fp32 weights): mm(out=acc), then addmm_.
#   "out_dtype" CUDA bf16/fp16: tensor-core GEMM with an fp32 result (torch >= 2.8):
#               mm(out_dtype=fp32, out=acc) for the first chunk, then
#               addmm(acc, a, b, out_dtype=fp32, out=acc); torch versions whose addmm.dtype_out
#               still requires `self` in the input dtype raise, and then (remembered for the
#               process) a per-chunk fp32 temporary is added instead.
#   "upcast"    CPU low precision (no out_dtype GEMM there): upcast the workspace-sized operands,
#               then as "native".
# In every path the first chunk *writes* acc (its prior content is never read: the buffer is
# `empty`), later chunks accumulate. The two out_dtype primitives are module functions so the
# tests can run the "out_dtype" branch logic on CPU tensors with an emulated GEMM.


def acc_path(acc, a):
    if a.dtype == acc.dtype:
        return "native"
    if a.is_cuda and _OUT_DTYPE_OK["mm"]:
        return "out_dtype"
    return "upcast"


_OUT_DTYPE_OK = {"mm": True, "addmm": True}


def _mm_f32out(a, b, out):
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_f32out_(acc, a, b):
    return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _mm_f32(a, b):
    return torch.mm(a, b, out_dtype=torch.float32)


def mm_acc(acc, a, b, first):
    """acc = a @ b (first) or acc += a @ b, with acc fp32 and exact fp32 accumulation."""
    path = acc_path(acc, a)
    if path == "out_dtype":
        try:
            if first:
                return _mm_f32out(a, b, acc)
            if _OUT_DTYPE_OK["addmm"]:
                try:
                    return _addmm_f32out_(acc, a, b)
                except (TypeError, RuntimeError, NotImplementedError):
                    _OUT_DTYPE_OK["addmm"] = False
            return acc.add_(_mm_f32(a, b))
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_OK["mm"] = False  # torch without mm(out_dtype=): upcast from now on
            path = "upcast"
    if path == "upcast":
        a, b = a.float(), b.float()
    if first:
        return torch.mm(a, b, out=acc)
    return acc.addmm_(a, b)


# -------------------------------------------------------------------------------------------------
# Host loops
# -------------------------------------------------------------------------------------------------


def _forward(hidden, weight, bias, targets, inv_t, want_ent, chunk):
    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    empty = dispatch.empty
    logp = empty(N, device=dev, dtype=torch.float32)
    ent = empty(N if want_ent else 0, device=dev, dtype=torch.float32)
    state = empty(3, N, device=dev, dtype=torch.float32)  # per-row softmax state, see lpe_forward
    ws = empty(min(chunk, max(N, 1)), V, device=dev, dtype=hidden.dtype)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        buf = logits_chunk(hidden[c0:c1], weight, bias, ws[: c1 - c0])
        lp, en, st = logprob_entropy_fwd_op(buf.unsqueeze(0), targets[c0:c1], inv_t, want_ent)
        logp[c0:c1] = lp
        state[:, c0:c1] = st
        if want_ent:
            ent[c0:c1] = en
    return logp, ent, state


def _backward(hidden, weight, bias, targets, state, g_lp, g_ent, inv_t, chunk, need_x, need_w, need_b):
    N, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    empty = dispatch.empty
    n_chunks = -(-N // chunk) if N else 0
    dx = empty(N if need_x else 0, H, device=dev, dtype=dt)
    # One chunk: dW in the weight dtype straight from one GEMM, as the unfused head does.
    # Several: accumulate in fp32 once (mm_acc) and round at the end.
    acc_dt = torch.float32 if n_chunks > 1 else weight.dtype
    dw = empty(V if need_w else 0, H, device=dev, dtype=acc_dt)
    has_b = need_b and bias is not None
    db = torch.zeros(V if has_b else 0, device=dev, dtype=torch.float32)
    if need_w and N == 0:
        dw.zero_()
    ws = empty(min(chunk, max(N, 1)), V, device=dev, dtype=dt)
    # narrow, not Python slicing: this loop also runs under FakeTensorMode with CUDA fake tensors
    # on a CPU-only torch (tests/kernels/test_linear_logprob_entropy.py), see dispatch.contiguous.
    for i, c0 in enumerate(range(0, N, chunk)):
        n = min(N, c0 + chunk) - c0
        x = hidden.narrow(0, c0, n)
        buf = logits_chunk(x, weight, bias, ws.narrow(0, 0, n))
        logprob_entropy_bwd_inplace_op(  # the logits chunk becomes dlogits
            buf,
            targets.narrow(0, c0, n),
            contiguous(state.narrow(1, c0, n)),
            g_lp.narrow(0, c0, n) if g_lp is not None else None,
            g_ent.narrow(0, c0, n) if g_ent is not None else None,
            inv_t,
        )
        if need_x:
            torch.mm(buf, weight, out=dx.narrow(0, c0, n))
        if need_w:
            mm_acc(dw, buf.t(), x, first=i == 0)
        if has_b:
            db.add_(buf.sum(0, dtype=torch.float32))
    if dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return dx, dw, db.to(weight.dtype)


# -------------------------------------------------------------------------------------------------
# Custom ops
# -------------------------------------------------------------------------------------------------


@torch.library.custom_op("axpo::linear_logprob_entropy_fwd", mutates_args=())
def linear_logprob_entropy_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_t: float,
    want_ent: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N] or [0], state [3, N]) of `hidden [N, H] @ weight.T (+ bias)`."""
    return _forward(hidden, weight, bias, targets, inv_t, want_ent, chunk)


@linear_logprob_entropy_fwd_op.register_fake
def _(hidden, weight, bias, targets, inv_t, want_ent, chunk):
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(N, **f32), hidden.new_empty(N if want_ent else 0, **f32), hidden.new_empty(3, N, **f32)


@torch.library.custom_op("axpo::linear_logprob_entropy_bwd", mutates_args=())
def linear_logprob_entropy_bwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    state: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    inv_t: float,
    chunk: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden [N, H] or [0, H], dweight [V, H] or [0, H], dbias [V] or [0])."""
    return _backward(hidden, weight, bias, targets, state, g_lp, g_ent, inv_t, chunk, need_x, need_w, need_b)


@linear_logprob_entropy_bwd_op.register_fake
def _(hidden, weight, bias, targets, state, g_lp, g_ent, inv_t, chunk, need_x, need_w, need_b):
    N, H = hidden.shape
    V = weight.shape[0]
    has_b = need_b and bias is not None
    return (hidden.new_empty(N if need_x else 0, H), weight.new_empty(V if need_w else 0, H),
            weight.new_empty(V if has_b else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_t, want_ent, chunk = inputs
    _, _, state = output
    ctx.save_for_backward(hidden, weight, bias, targets, state)
    ctx.inv_t, ctx.want_ent, ctx.chunk = inv_t, want_ent, chunk
    ctx.mark_non_differentiable(state)
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, g_lp, g_ent, _g_state):
    hidden, weight, bias, targets, state = ctx.saved_tensors
    if not ctx.want_ent:
        g_ent = None
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if (g_lp is None and g_ent is None) or not (need_x or need_w or need_b):
        return (None,) * 7
    if g_lp is not None:
        g_lp = g_lp.float().contiguous()
    if g_ent is not None:
        g_ent = g_ent.float().contiguous()
    dx, dw, db = linear_logprob_entropy_bwd_op(
        hidden, weight, bias, targets, state, g_lp, g_ent, ctx.inv_t, ctx.chunk, need_x, need_w, need_b
    )
    return (dx if need_x else None, dw if need_w else None, db if need_b and bias is not None else None,
            None, None, None, None)


torch.library.register_autograd(
    "axpo::linear_logprob_entropy_fwd", _autograd_backward, setup_context=_setup_context
)


# -------------------------------------------------------------------------------------------------
# Public function
# -------------------------------------------------------------------------------------------------


def check_head_args(hidden, weight, targets, bias, temperature, op="linear_logprob_entropy"):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("hidden, weight and bias must share one dtype")
    if targets.is_floating_point():
        raise TypeError("targets must be integer token ids")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    check_same_device(op, hidden=hidden, weight=weight, targets=targets, bias=bias)


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
    Under `torch.no_grad()` (old-policy and reference log-probs) nothing is saved.
    """
    check_head_args(hidden, weight, targets, bias, temperature)
    lead = targets.shape
    H = hidden.shape[-1]
    V = weight.shape[0]
    x = hidden.reshape(-1, H)
    if x.stride(-1) != 1:
        x = contiguous(x)
    t = targets.reshape(-1)
    chunk = chunk_tokens_for(x.shape[0], V, x.dtype, x.device, chunk_tokens)
    logp, ent, _ = linear_logprob_entropy_fwd_op(
        x, weight, bias, t, 1.0 / float(temperature), bool(return_entropy), int(chunk)
    )
    return logp.view(lead), (ent.view(lead) if return_entropy else None)
