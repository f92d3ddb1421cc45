"""Log-prob of the sampled token and softmax entropy, from logits `[..., V]`, forward and backward.

Layers (quack / flash-attn style):
1. Triton kernels `_lpe_fwd_kernel` / `_lpe_bwd_kernel` and the chunked PyTorch path
   `_torch_forward` / `_torch_backward`: same math, one pass over the vocabulary per row.
2. `lpe_forward` / `lpe_backward`: out-variant host functions choosing the backend
   (`dispatch.backend_for`); the fused LM head (linear_logprob_entropy.py) calls these on its
   logits chunks.
3. torch.library custom ops `axpo::logprob_entropy_fwd` / `axpo::logprob_entropy_bwd` (and the
   in-place `axpo::logprob_entropy_bwd_inplace_` the fused head uses), with fake implementations
   and autograd registered on the forward op.
4. `logprob_entropy`: the documented public function.
The reference is `reference.logprob_entropy_ref`.

Math (per row, fp32; shared/design/kernels.md): keep a running max m, s = sum exp(z - m) and
t = sum exp(z - m) * (z - m). Then logZ = m + log s, logp = z_y - logZ, H = log s - t / s and
E[z] = m + t / s. Backward needs only logZ and E[z]:
    dz_j = [g_lp (1[j = y] - p_j) + g_H p_j (E[z] - z_j)] / T,   p_j = exp(z_j - logZ).
Everything is kept *relative to the row max*: the saved per-row state is (m, log s, t / s), not
(logZ, E[z]), and p_j = exp((z_j - m) - log s), E[z] - z_j = t / s - (z_j - m). With |z| ~ 1e4
(fp16 extremes, all-negative rows) the absolute logZ = m + log s rounds by ~5e-4 in fp32 and the
backward then loses three digits; the relative form was measured to match PyTorch there.
Masked rows (target outside [0, V), e.g. -100) give logp = H = 0 and exactly zero gradient.
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, backend_for, check_same_device, contiguous, next_pow2, triton_fn

if HAS_TRITON:
    import triton
    import triton.language as tl

# -------------------------------------------------------------------------------------------------
# Triton kernels
# -------------------------------------------------------------------------------------------------

# Default tiles. 4096 fp32 per program over 8 warps is 16 values per thread for z, e and the
# products: no spills at sm_80/sm_90 (tests/kernels/test_aot.py prints the ptxas counts).
FWD_BLOCK_V = 4096
FWD_NUM_WARPS = 8
BWD_BLOCK_V = 4096
BWD_NUM_WARPS = 8

if HAS_TRITON:

    @triton.jit
    def _lpe_fwd_kernel(
        x_ptr,  # logits, rows addressed as (outer, inner) with strides; columns contiguous
        stride_outer,
        stride_inner,
        inner,
        tgt_ptr,
        logp_ptr,  # fp32 [N]
        ent_ptr,  # fp32 [N] (unused unless HAS_ENT)
        m_ptr,  # fp32 [N]: row max, saved for backward
        ls_ptr,  # fp32 [N]: log s, saved for backward
        md_ptr,  # fp32 [N]: t / s = E[z] - m, saved for backward (if HAS_ENT)
        V,
        inv_t,
        HAS_ENT: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        o = row // inner
        base = x_ptr + o * stride_outer + (row - o * inner) * stride_inner  # int64 offsets
        tgt = tl.load(tgt_ptr + row).to(tl.int64)
        valid = (tgt >= 0) & (tgt < V)

        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(z, 0))
            # A tile (or row prefix) of -inf only: keep the shift finite so exp gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            e = tl.exp(z - m_safe)
            if HAS_ENT:
                # z - m_safe, clamped where exp() is 0 anyway, so 0 * -inf (NaN) never occurs
                d = tl.maximum(z - m_safe, -200.0)
                # re-centre the running t from the old max to the new one (0 while s == 0)
                shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
                t = alpha * (t + s * shift) + tl.sum(e * d, 0)
            s = s * alpha + tl.sum(e, 0)
            m = m_new

        log_s = tl.log(s)
        zy = tl.load(base + tl.where(valid, tgt, 0)).to(tl.float32) * inv_t
        logp = tl.where(valid, (zy - m) - log_s, 0.0)
        tl.store(logp_ptr + row, logp)
        tl.store(m_ptr + row, m)
        tl.store(ls_ptr + row, log_s)
        if HAS_ENT:
            mean_dev = t / s
            tl.store(ent_ptr + row, tl.where(valid, log_s - mean_dev, 0.0))
            tl.store(md_ptr + row, mean_dev)

    @triton.jit
    def _lpe_bwd_kernel(
        x_ptr,
        stride_outer,
        stride_inner,
        inner,
        tgt_ptr,
        m_ptr,
        ls_ptr,
        md_ptr,
        glp_ptr,  # upstream grad of logp (fp32 [N]) if HAS_GLP
        gent_ptr,  # upstream grad of entropy (fp32 [N]) if HAS_GENT
        out_ptr,  # dlogits, contiguous rows of length out_stride, written in its own dtype
        out_stride,
        V,
        inv_t,
        HAS_GLP: tl.constexpr,
        HAS_GENT: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # 2-D grid (row, vocab tile): every tile is independent once logZ and E[z] are known, so
        # the backward is one read and one write of the logits (in place is allowed: out == x).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        o = row // inner
        base = x_ptr + o * stride_outer + (row - o * inner) * stride_inner
        tgt = tl.load(tgt_ptr + row).to(tl.int64)
        valid = (tgt >= 0) & (tgt < V)
        m = tl.load(m_ptr + row)
        log_s = tl.load(ls_ptr + row)
        z = tl.load(base + cols, mask=cmask, other=float("-inf")).to(tl.float32) * inv_t - m
        # Clamp where p underflows to 0 anyway (exp(-200) == 0 in fp32): -inf logits then give
        # p = 0 and a finite (E[z] - z), never 0 * inf.
        z = tl.maximum(z, log_s - 200.0)
        p = tl.exp(z - log_s)
        if HAS_GLP:
            glp = tl.load(glp_ptr + row)
        else:
            glp = 0.0
        if HAS_GENT:
            gent = tl.load(gent_ptr + row)
            mean_dev = tl.load(md_ptr + row)
            coef = gent * (mean_dev - z) - glp
        else:
            coef = -glp + tl.zeros_like(z)
        dz = p * coef
        dz = tl.where(cols == tgt, dz + glp, dz)
        dz = tl.where(valid, dz * inv_t, 0.0)  # masked rows: exactly zero, whatever the logits
        tl.store(out_ptr + row * out_stride + cols, dz.to(out_ptr.dtype.element_ty), mask=cmask)


def _triton_forward(x3, tgt, inv_t, want_ent):
    outer, inner, V = x3.shape
    N = outer * inner
    dev = x3.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    ent = torch.empty(N, device=dev, dtype=torch.float32) if want_ent else logp
    state = _new_state(N, dev, want_ent)
    if N:
        block = min(FWD_BLOCK_V, next_pow2(V))
        triton_fn(_lpe_fwd_kernel, dev)[(N,)](
            x3, x3.stride(0), x3.stride(1), inner, tgt, logp, ent, state[0], state[1], state[2], V, inv_t,
            HAS_ENT=want_ent, BLOCK_V=block, num_warps=FWD_NUM_WARPS if block >= 2048 else 4,
        )
    return logp, (ent if want_ent else None), state


def _triton_backward(x3, tgt, state, g_lp, g_ent, inv_t, out2):
    outer, inner, V = x3.shape
    N = outer * inner
    if N == 0:
        return out2
    block = min(BWD_BLOCK_V, next_pow2(V))
    dummy = state[0]
    triton_fn(_lpe_bwd_kernel, x3.device)[(N, triton.cdiv(V, block))](
        x3, x3.stride(0), x3.stride(1), inner, tgt, state[0], state[1], state[2],
        g_lp if g_lp is not None else dummy,
        g_ent if g_ent is not None else dummy,
        out2, out2.stride(0), V, inv_t,
        HAS_GLP=g_lp is not None, HAS_GENT=g_ent is not None,
        BLOCK_V=block, num_warps=BWD_NUM_WARPS if block >= 2048 else 4,
    )
    return out2


# -------------------------------------------------------------------------------------------------
# PyTorch path (CPU, or any device with AXPO_KERNEL_BACKEND=torch)
# -------------------------------------------------------------------------------------------------

# Rows per step: two fp32 scratch rows-blocks of ~1 MiB each stay in the 4 MiB L2 of the bench
# machine. Measured (2048 x 151936 fp32, forward): 1-2 rows 0.23-0.25 s, 8 rows 0.30 s, 64 rows
# 0.56 s, eager log_softmax 1.48 s. So every elementwise pass after the first read hits cache.
_SCRATCH_ELEMS = 1 << 18
# z - m below this is exp() == 0 in fp32 (exp(-104) underflows); clamping there turns -inf into a
# finite number so 0 * (-inf) never appears, without changing any probability.
_CLAMP = -200.0

# torch.compile was measured on the per-chunk backward (2048 x 151936 fp32): 0.51-0.79 s against
# 0.56 s for these eager in-place ops, after 19 s of compilation. No measurable gain, so this path
# stays eager (and needs no compiler at run time).


def _new_state(N, dev, want_ent):
    """[3, N] fp32 per-row state; row 2 (t / s) is only computed with entropy, else zeros."""
    if want_ent:
        return torch.empty(3, N, device=dev, dtype=torch.float32)
    state = torch.empty(3, N, device=dev, dtype=torch.float32)
    state[2].zero_()
    return state


def _load_scaled(z, x, inv_t):
    """z = float32(x) / T. For fp32 one fused pass; for bf16/fp16 upcast first, because
    `torch.mul(x_bf16, c, out=z_fp32)` computes in bf16 and rounds before the cast."""
    if x.dtype == torch.float32:
        if inv_t == 1.0:
            z.copy_(x)
        else:
            torch.mul(x, inv_t, out=z)
    else:
        z.copy_(x)
        if inv_t != 1.0:
            z.mul_(inv_t)


def _row_blocks(outer, inner, V):
    rows = max(1, _SCRATCH_ELEMS // max(V, 1))
    for o in range(outer):
        for t0 in range(0, inner, rows):
            t1 = min(inner, t0 + rows)
            yield o, t0, t1, o * inner + t0, o * inner + t1


def _torch_forward(x3, tgt, inv_t, want_ent):
    outer, inner, V = x3.shape
    N = outer * inner
    dev = x3.device
    f32 = dict(device=dev, dtype=torch.float32)
    tgt = tgt.long()
    valid = (tgt >= 0) & (tgt < V)
    tgt_c = torch.where(valid, tgt, torch.zeros_like(tgt)).unsqueeze(1)
    m = torch.empty(N, 1, **f32)
    zy = torch.empty(N, 1, **f32)
    s = torch.empty(N, **f32)
    t = torch.empty(N, **f32) if want_ent else None
    rows = max(1, _SCRATCH_ELEMS // max(V, 1))
    zbuf = torch.empty(min(rows, max(inner, 1)), V, **f32)
    ebuf = torch.empty_like(zbuf)
    for o, t0, t1, r0, r1 in _row_blocks(outer, inner, V):
        r = t1 - t0
        z, e = zbuf[:r], ebuf[:r]
        _load_scaled(z, x3[o, t0:t1], inv_t)
        torch.amax(z, 1, keepdim=True, out=m[r0:r1])
        z.sub_(m[r0:r1])
        torch.gather(z, 1, tgt_c[r0:r1], out=zy[r0:r1])
        if want_ent:
            z.clamp_(min=_CLAMP)
        torch.exp(z, out=e)
        torch.sum(e, 1, out=s[r0:r1])
        if want_ent:
            torch.linalg.vecdot(e, z, out=t[r0:r1])
    state = _new_state(N, dev, want_ent)  # (m, log s, t / s) - see the module docstring
    state[0] = m.squeeze(1)
    torch.log(s, out=state[1])
    log_s = state[1]
    zero = torch.zeros((), **f32)
    logp = torch.where(valid, zy.squeeze(1) - log_s, zero)
    if not want_ent:
        return logp, None, state
    torch.div(t, s, out=state[2])
    ent = torch.where(valid, log_s - state[2], zero)
    return logp, ent, state


def _torch_backward(x3, tgt, state, g_lp, g_ent, inv_t, out2):
    """Write dlogits into `out2` ([N, V], rows contiguous); `out2` may alias `x3` (in place)."""
    outer, inner, V = x3.shape
    N = outer * inner
    dev = x3.device
    f32 = dict(device=dev, dtype=torch.float32)
    tgt = tgt.long()
    valid = (tgt >= 0) & (tgt < V)
    vf = valid.to(torch.float32)
    tgt_c = torch.where(valid, tgt, torch.zeros_like(tgt)).unsqueeze(1)
    # Per-row coefficients with 1/T and the row mask folded in; with z' = z - m:
    # dz = p * (c1 - gH' z') + gl' 1[j = y],  c1 = (gH t/s - gl) / T,  gH' = gH / T,  gl' = gl / T.
    gl = g_lp.float() * vf * inv_t if g_lp is not None else torch.zeros(N, **f32)
    if g_ent is not None:
        gh = g_ent.float() * vf * inv_t
        c1 = (gh * state[2] - gl).unsqueeze(1)
        neg_gh = (-gh).unsqueeze(1)
    else:
        c1 = (-gl).unsqueeze(1)
    gl = gl.unsqueeze(1)
    # Masked rows already have zero coefficients; garbage (NaN/inf) logits there still need an
    # explicit fill. One host sync here, on the PyTorch path only.
    any_masked = bool((~valid).any())
    mx = state[0].unsqueeze(1)
    lz = state[1].unsqueeze(1)
    lo = lz + _CLAMP
    direct = out2.dtype == torch.float32
    rows = max(1, _SCRATCH_ELEMS // max(V, 1))
    zbuf = torch.empty(min(rows, max(inner, 1)), V, **f32)
    ebuf = None if direct else torch.empty_like(zbuf)
    for o, t0, t1, r0, r1 in _row_blocks(outer, inner, V):
        r = t1 - t0
        z = zbuf[:r]
        e = out2[r0:r1] if direct else ebuf[:r]
        # z' = z - m, read before `e` (maybe the same memory) is written
        if x3.dtype == torch.float32 and inv_t == 1.0:
            torch.sub(x3[o, t0:t1], mx[r0:r1], out=z)
        else:
            _load_scaled(z, x3[o, t0:t1], inv_t)
            z.sub_(mx[r0:r1])
        if g_ent is not None:
            z.clamp_(min=lo[r0:r1])
            torch.sub(z, lz[r0:r1], out=e)
            e.exp_()
            z.mul_(neg_gh[r0:r1]).add_(c1[r0:r1])
            e.mul_(z)
        else:
            torch.sub(z, lz[r0:r1], out=e)
            e.exp_()
            e.mul_(c1[r0:r1])
        e.scatter_add_(1, tgt_c[r0:r1], gl[r0:r1])
        if any_masked:
            e.masked_fill_(~valid[r0:r1].unsqueeze(1), 0.0)
        if not direct:
            out2[r0:r1].copy_(e)
    return out2


# -------------------------------------------------------------------------------------------------
# Host functions (out-variants shared with the fused head)
# -------------------------------------------------------------------------------------------------


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """View `[..., V]` logits as `[outer, inner, V]` without copying when possible.

    A shifted view such as `logits[:, :-1]` of `[B, T, V]` cannot be flattened to one row stride,
    but it is exactly (outer=B, inner=T-1) with two strides, which both backends address
    directly; copying it would cost a full extra read and write of the logits.
    """
    V = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = contiguous(logits)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    try:
        flat = logits.view(-1, V)
        return flat.unsqueeze(0)
    except (RuntimeError, ValueError):  # ValueError: what FakeTensorMode raises instead
        pass
    if logits.dim() == 3:
        return logits
    return contiguous(logits).view(1, -1, V)


def lpe_forward(x3, targets, inv_t, want_ent, backend=None):
    """(logp `[N]`, entropy `[N]` or None, state `[3, N]` = (m, log s, t / s)), fp32, rows of `x3`.

    `state[2]` is only filled when `want_ent` (the entropy gradient is the only user).
    """
    backend = backend or backend_for(x3)
    fn = _triton_forward if backend == "triton" else _torch_forward
    return fn(x3, targets.reshape(-1), float(inv_t), bool(want_ent))


def lpe_backward(x3, targets, state, g_lp, g_ent, inv_t, out2, backend=None):
    """Write dlogits for rows of `x3` into `out2` `[N, V]` (may alias `x3`) and return it."""
    backend = backend or backend_for(x3)
    if g_lp is not None:
        g_lp = g_lp.reshape(-1).float().contiguous()
    if g_ent is not None:
        g_ent = g_ent.reshape(-1).float().contiguous()
    fn = _triton_backward if backend == "triton" else _torch_backward
    return fn(x3, targets.reshape(-1), state, g_lp, g_ent, float(inv_t), out2)


# -------------------------------------------------------------------------------------------------
# torch.library custom ops (as flash-attn and quack register theirs): opaque to torch.compile,
# with fake (meta) implementations so they trace under FakeTensorMode on any device, and autograd
# registered on the op itself.
# -------------------------------------------------------------------------------------------------


def _nrows(x3):
    return x3.shape[0] * x3.shape[1]


@torch.library.custom_op("axpo::logprob_entropy_fwd", mutates_args=())
def logprob_entropy_fwd_op(
    x3: torch.Tensor, targets: torch.Tensor, inv_t: float, want_ent: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N] or [0] without entropy, state [3, N]) for logits rows `x3` [O, I, V]."""
    logp, ent, state = lpe_forward(x3, targets, inv_t, want_ent)
    return logp, (ent if ent is not None else logp.new_empty(0)), state


@logprob_entropy_fwd_op.register_fake
def _(x3, targets, inv_t, want_ent):
    N = _nrows(x3)
    f32 = dict(dtype=torch.float32)
    return x3.new_empty(N, **f32), x3.new_empty(N if want_ent else 0, **f32), x3.new_empty(3, N, **f32)


@torch.library.custom_op("axpo::logprob_entropy_bwd", mutates_args=())
def logprob_entropy_bwd_op(
    x3: torch.Tensor,
    targets: torch.Tensor,
    state: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    inv_t: float,
) -> torch.Tensor:
    """dlogits [N, V] in the logits dtype (a fresh tensor)."""
    out = torch.empty(_nrows(x3), x3.shape[-1], device=x3.device, dtype=x3.dtype)
    return lpe_backward(x3, targets, state, g_lp, g_ent, inv_t, out)


@logprob_entropy_bwd_op.register_fake
def _(x3, targets, state, g_lp, g_ent, inv_t):
    return x3.new_empty(_nrows(x3), x3.shape[-1])


@torch.library.custom_op("axpo::logprob_entropy_bwd_inplace_", mutates_args=("buf",))
def logprob_entropy_bwd_inplace_op(
    buf: torch.Tensor,
    targets: torch.Tensor,
    state: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    inv_t: float,
) -> None:
    """Turn the logits chunk `buf` [n, V] (rows contiguous) into dlogits in place (fused head)."""
    lpe_backward(buf.unsqueeze(0), targets, state, g_lp, g_ent, inv_t, buf)


@logprob_entropy_bwd_inplace_op.register_fake
def _(buf, targets, state, g_lp, g_ent, inv_t):
    return None


def _lpe_setup_context(ctx, inputs, output):
    x3, targets, inv_t, want_ent = inputs
    _, _, state = output
    ctx.save_for_backward(x3, targets, state)
    ctx.inv_t, ctx.want_ent = inv_t, want_ent
    ctx.mark_non_differentiable(state)
    ctx.set_materialize_grads(False)  # None for an unused output: its term is skipped entirely


def _lpe_backward(ctx, g_lp, g_ent, _g_state):
    x3, targets, state = ctx.saved_tensors
    if not ctx.want_ent:
        g_ent = None
    if (g_lp is None and g_ent is None) or not ctx.needs_input_grad[0]:
        return None, None, None, None
    dx = logprob_entropy_bwd_op(x3, targets, state, g_lp, g_ent, ctx.inv_t)
    return dx.view(x3.shape), None, None, None


torch.library.register_autograd("axpo::logprob_entropy_fwd", _lpe_backward, setup_context=_lpe_setup_context)


# -------------------------------------------------------------------------------------------------
# Public function
# -------------------------------------------------------------------------------------------------


def logprob_entropy(logits, targets, *, temperature=1.0, return_entropy=True):
    """Log-prob of `targets` and softmax entropy of `logits / temperature`.

    Args:
        logits: `[..., V]`, fp32/bf16/fp16, any row strides (the last dim must be contiguous, or
            it is copied). Never upcast as a whole: each row is read once and upcast in fp32.
        targets: `[...]` integer ids. A target outside `[0, V)` (e.g. -100) masks the row:
            logp = entropy = 0 and its gradient is exactly zero.
        temperature: logits are divided by it in fp32, after loading.
        return_entropy: if False, entropy is neither computed nor returned (None).

    Returns:
        `(logp, entropy)`, fp32 `[...]`; both differentiable with respect to `logits`. The
        backward writes `dlogits` in the logits dtype and builds no other `[N, V]` tensor.
    Under `torch.no_grad()` (old-policy and reference log-probs) nothing is saved.
    The work is the custom op `torch.ops.axpo.logprob_entropy_fwd` (backward
    `axpo::logprob_entropy_bwd`), so it traces under FakeTensorMode and torch.compile.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if targets.is_floating_point():
        raise TypeError("targets must be integer token ids")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    check_same_device("logprob_entropy", logits=logits, targets=targets)
    lead = targets.shape
    x3 = as_rows(logits)
    logp, ent, _ = logprob_entropy_fwd_op(x3, targets.reshape(-1), 1.0 / float(temperature), bool(return_entropy))
    return logp.view(lead), (ent.view(lead) if return_entropy else None)
