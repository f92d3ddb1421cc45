"""Every public fused op is a torch.library custom op with a fake implementation and registered
autograd: it traces under FakeTensorMode with CUDA fake tensors on this CPU-only torch (shapes,
dtypes and devices checked), rejects a CPU tensor mixed into CUDA inputs, passes
`torch.library.opcheck` on CPU, and runs under `torch.compile(fullgraph=True)` with gradients
equal to eager.

`swiglu_down` and `rms_norm` are plain autograd Functions of aten ops, no custom ops: here they
only get the FakeTensorMode forward (tests/test_swiglu.py and tests/test_rmsnorm.py trace their
backward on fake CPU tensors).

Only forwards are traced on fake CUDA tensors: autograd on them aborts the process on a CPU-only
build. Fake-tensor notes for CPU-only builds: Python indexing (`x[1:]`) and `Tensor.contiguous()`
on a fake CUDA tensor take a CUDA device guard and fail, so the tests build inputs with `narrow`
(and the ops avoid both outside their custom ops, see `dispatch.contiguous`).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from axpo.kernels import (
    clipped_policy_loss,
    group_advantages,
    grouped_policy_loss,
    linear_logprob_entropy,
    linear_policy_loss,
    logprob_entropy,
    rms_norm,
    swiglu_down,
)

F32, BF16, I64 = torch.float32, torch.bfloat16, torch.long


def cuda(*shape, dtype=F32):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def _is(t, shape, dtype=F32, device="cuda"):
    assert isinstance(t, torch.Tensor)
    assert tuple(t.shape) == tuple(shape), (tuple(t.shape), shape)
    assert t.dtype == dtype, (t.dtype, dtype)
    assert t.device.type == device, t.device


# -------------------------------------------------------------------------------------------------
# FakeTensorMode, device="cuda"
# -------------------------------------------------------------------------------------------------


def _fake_logprob_entropy():
    B, T, V = 2, 9, 1000
    logits = cuda(B, T + 1, V, dtype=BF16).narrow(1, 0, T)  # shifted, non-contiguous view
    targets = cuda(B, T, dtype=I64)
    lp, ent = logprob_entropy(logits, targets, temperature=0.7)
    _is(lp, (B, T))
    _is(ent, (B, T))
    lp, none = logprob_entropy(logits, targets, return_entropy=False)
    _is(lp, (B, T))
    assert none is None


def _fake_linear_logprob_entropy():
    B, T, H, V = 2, 7, 64, 1003
    h, w, b = cuda(B, T, H, dtype=BF16), cuda(V, H, dtype=BF16), cuda(V, dtype=BF16)
    t = cuda(B, T, dtype=I64)
    lp, ent = linear_logprob_entropy(h, w, t, bias=b, chunk_tokens=3)
    _is(lp, (B, T))
    _is(ent, (B, T))


def _fake_group_advantages():
    S = 12
    r, g, sub = cuda(S), cuda(S, dtype=I64), cuda(S, dtype=I64)
    _is(group_advantages(r, g), (S,))
    adv, st = group_advantages(r, g, subgroup_ids=sub, mode="dr_grpo", return_group_stats=True, num_segments=5)
    _is(adv, (S,))
    for k in ("mean", "std"):
        _is(st[k], (5,))
    _is(st["count"], (5,), I64)
    _is(st["zero_std"], (5,), torch.bool)
    _is(st["segment"], (S,), I64)


def _fake_clipped_policy_loss():
    R, T = 6, 11
    lp, old, ref = cuda(R, T), cuda(R, T), cuda(R, T)
    mask = cuda(R, T, dtype=torch.bool)
    for adv in (cuda(R), cuda(R, T)):
        for agg in ("token-mean", "seq-mean-token-mean"):
            loss, st = clipped_policy_loss(lp, old, adv, mask, ref_logp=ref, beta=0.04, agg=agg, normalizer=17.0)
            _is(loss, ())
            for k in ("clip_frac", "ratio_mean", "kl_mean"):
                _is(st[k], ())


def _fake_grouped_policy_loss():
    R, T = 6, 11
    lp, old = cuda(R, T), cuda(R, T)
    mask = cuda(R, T)
    loss, st = grouped_policy_loss(lp, old, mask, cuda(R), cuda(R, dtype=I64), subgroup_ids=cuda(R, dtype=I64))
    _is(loss, ())
    _is(st["advantages"], (R,))
    _is(st["zero_std_frac"], ())


def _fake_linear_policy_loss():
    B, T, H, V = 3, 5, 32, 777
    h, w = cuda(B, T, H, dtype=BF16), cuda(V, H, dtype=BF16)
    t = cuda(B, T, dtype=I64)
    old, ref, mask = cuda(B, T), cuda(B, T), cuda(B, T, dtype=torch.bool)
    loss, st = linear_policy_loss(h, w, t, old, cuda(B), mask, ref_logp=ref, beta=0.04, chunk_tokens=4)
    _is(loss, ())
    _is(st["logp"], (B, T))
    _is(st["entropy"], (B, T))
    for k in ("clip_frac", "ratio_mean", "kl_mean"):
        _is(st[k], ())


def _fake_swiglu_down():
    # No requires_grad: autograd on fake CUDA tensors aborts a CPU-only build (module docstring).
    B, T, I, H = 2, 7, 96, 40
    _is(swiglu_down(cuda(B, T, I, dtype=BF16), cuda(B, T, I, dtype=BF16), cuda(H, I, dtype=BF16),
                    cuda(H, dtype=BF16)), (B, T, H), BF16)


def _fake_rms_norm():
    B, T, N, D = 2, 7, 4, 32
    _is(rms_norm(cuda(B, T, N, D, dtype=BF16), cuda(D, dtype=BF16), 1e-6), (B, T, N, D), BF16)
    _is(rms_norm(cuda(B, T, D, dtype=BF16), cuda(D), 1e-6), (B, T, D))   # fp32 weight promotes


FAKE_CASES = {
    "logprob_entropy": _fake_logprob_entropy,
    "linear_logprob_entropy": _fake_linear_logprob_entropy,
    "group_advantages": _fake_group_advantages,
    "clipped_policy_loss": _fake_clipped_policy_loss,
    "grouped_policy_loss": _fake_grouped_policy_loss,
    "linear_policy_loss": _fake_linear_policy_loss,
    "swiglu_down": _fake_swiglu_down,
    "rms_norm": _fake_rms_norm,
}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", list(FAKE_CASES))
def test_forward_traces_under_fake_cuda(name, backend, monkeypatch):
    monkeypatch.setenv("AXPO_KERNEL_BACKEND", backend)  # auto: the Triton branch on CUDA tensors
    with FakeTensorMode():
        FAKE_CASES[name]()


def test_every_public_op_has_a_fake_case():
    import axpo.kernels as K

    public = {n for n in K.__all__ if callable(getattr(K, n)) and n not in ("backend_for",)}
    assert public == set(FAKE_CASES), public ^ set(FAKE_CASES)


MIXES = {
    "logprob_entropy": lambda: logprob_entropy(cuda(4, 50), torch.zeros(4, dtype=I64)),
    "linear_logprob_entropy": lambda: linear_logprob_entropy(cuda(4, 8), torch.empty(50, 8), cuda(4, dtype=I64)),
    "linear_logprob_entropy(bias)": lambda: linear_logprob_entropy(cuda(4, 8), cuda(50, 8), cuda(4, dtype=I64),
                                                                   bias=torch.empty(50)),
    "group_advantages": lambda: group_advantages(cuda(6), torch.zeros(6, dtype=I64)),
    "clipped_policy_loss": lambda: clipped_policy_loss(cuda(2, 3), cuda(2, 3), torch.zeros(2), cuda(2, 3)),
    "clipped_policy_loss(ref)": lambda: clipped_policy_loss(cuda(2, 3), cuda(2, 3), cuda(2), cuda(2, 3),
                                                            ref_logp=torch.zeros(2, 3), beta=0.1),
    "grouped_policy_loss": lambda: grouped_policy_loss(cuda(2, 3), cuda(2, 3), cuda(2, 3), torch.zeros(2),
                                                       cuda(2, dtype=I64)),
    "linear_policy_loss": lambda: linear_policy_loss(cuda(2, 3, 8), cuda(50, 8), cuda(2, 3, dtype=I64),
                                                     torch.zeros(2, 3), cuda(2), cuda(2, 3)),
}


@pytest.mark.parametrize("name", list(MIXES))
def test_cpu_tensor_mixed_into_cuda_inputs_raises(name):
    with FakeTensorMode():
        with pytest.raises(ValueError, match="one device"):
            MIXES[name]()


def test_fake_mode_alone_would_not_catch_a_mix():
    """Why the ops check devices themselves: a custom op's fake implementation accepts a mix."""
    with FakeTensorMode():
        out = torch.ops.axpo.logprob_entropy_fwd(cuda(1, 8, 50), torch.empty(8, dtype=I64), 1.0, True)
        assert out[0].device.type == "cuda"


# -------------------------------------------------------------------------------------------------
# opcheck (schema, fake vs real, autograd registration, AOT dispatch) on CPU
# -------------------------------------------------------------------------------------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    N, H, V = 6, 8, 50
    x3 = rn(1, N, V).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100
    h, w, b = rn(N, H).requires_grad_(), (rn(V, H) * 0.3).requires_grad_(), rn(V).requires_grad_()
    R, T = 3, 4
    lp = (rn(R, T) - 2).requires_grad_()
    old, ref = lp.detach() + 0.2 * rn(R, T), lp.detach() + 0.1 * rn(R, T)
    mask = rn(R, T) > -0.5
    rs = torch.full((R,), 1.0 / 7)
    S = 7
    seg = torch.tensor([1, 0, 1, 2, 0, 1, 3])
    order = torch.argsort(seg, stable=True)
    K = torch.ops.axpo
    return {
        "logprob_entropy_fwd": (K.logprob_entropy_fwd.default, (x3, t, 0.7, True)),
        "logprob_entropy_fwd(no ent)": (K.logprob_entropy_fwd.default, (x3, t, 1.0, False)),
        "linear_logprob_entropy_fwd": (K.linear_logprob_entropy_fwd.default, (h, w, b, t, 0.7, True, 4)),
        "linear_logprob_entropy_fwd(no bias)": (K.linear_logprob_entropy_fwd.default, (h, w, None, t, 1.0, True, 2)),
        "policy_loss": (K.policy_loss.default, (lp, old, rn(R), mask, ref, rs, 0.2, 0.28, 0.05, None, None, None, None)),
        "group_advantages": (K.group_advantages.default, (rn(S), seg, order, True, 1e-6)),
        "linear_policy_loss_fwd": (K.linear_policy_loss_fwd.default,
                                   (h, w, b, t, old.reshape(-1)[:N].contiguous(), rn(N), mask.reshape(-1)[:N].contiguous(),
                                    None, torch.full((N,), 0.2), 0.7, 0.2, 0.2, 0.0, True, 4, True, True, True)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if name == "linear_policy_loss_fwd":
        # Its backward scales the saved dX/dW/db (op outputs) in place instead of copying a
        # [V, H] tensor; AOT dispatch cannot partition that when those outputs are also graph
        # outputs, as opcheck makes them. The public function never returns them, and
        # test_compile_fullgraph_matches_eager[_fused] runs it through AOT autograd.
        utils = utils[:3]
    torch.library.opcheck(op, args, test_utils=utils)


def test_inplace_backward_op_opcheck():
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(5, 40, generator=g)
    t = torch.randint(0, 40, (5,), generator=g)
    from axpo.kernels.logprob_entropy import lpe_forward

    _, _, st = lpe_forward(buf.unsqueeze(0), t, 1.0, True)
    torch.library.opcheck(torch.ops.axpo.logprob_entropy_bwd_inplace_.default,
                          (buf, t, st, torch.randn(5, generator=g), torch.randn(5, generator=g), 1.0))


# -------------------------------------------------------------------------------------------------
# torch.compile sees through the ops (no graph break), same values and gradients as eager
# -------------------------------------------------------------------------------------------------


def _head_and_loss(h, w, t, old, adv, mask, ref):
    lp, ent = linear_logprob_entropy(h, w, t, chunk_tokens=5)
    loss, st = clipped_policy_loss(lp, old, adv, mask, ref_logp=ref, beta=0.04)
    return loss + 0.01 * ent.mean(), st["clip_frac"]


def _fused(h, w, t, old, adv, mask, ref):
    loss, st = linear_policy_loss(h, w, t, old, adv, mask, ref_logp=ref, beta=0.04, chunk_tokens=5)
    return loss, st["clip_frac"]


def _logits_and_groups(x, t, old, mask, r, gid):
    lp, ent = logprob_entropy(x, t)
    loss, st = grouped_policy_loss(lp, old, mask, r, gid)
    return loss + ent.sum() * 1e-3, st["zero_std_frac"]


@pytest.mark.parametrize("fn", [_head_and_loss, _fused, _logits_and_groups])
def test_compile_fullgraph_matches_eager(fn):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 3, 6, 16, 301
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.2
    t = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g) * 6
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    if fn is _logits_and_groups:
        x = torch.randn(B, T, V, generator=g)
        args = [x, t, old, mask, torch.randn(B, generator=g), torch.tensor([4, 9, 4])]
        diff = [0]
    else:
        args = [h, w, t, old, torch.randn(B, generator=g), mask, ref]
        diff = [0, 1]

    def run(f):
        a = [x.clone().requires_grad_() if i in diff else x for i, x in enumerate(args)]
        loss, stat = f(*a)
        loss.backward()
        return [loss.detach(), stat] + [a[i].grad for i in diff]

    want = run(fn)
    got = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


_SHADOW_CHECK = r"""
import importlib, sys
sys.path.insert(0, sys.argv[1])          # a checkout's root: its kernels/ is importable as `kernels`
import torch
from torch._library.custom_ops import OPDEFS
import axpo.kernels as ak
from axpo.kernels import policy_loss as pl
before = OPDEFS["axpo::policy_loss"]
importlib.import_module("kernels")       # what transformers does to probe for HF's `kernels`
try:
    importlib.import_module("kernels.policy_loss")
except ImportError:
    pass
assert OPDEFS["axpo::policy_loss"] is before is pl.policy_loss_op, "axpo::policy_loss was registered again"
x = torch.randn(3, 7, requires_grad=True)
loss, _ = ak.clipped_policy_loss(x, x.detach(), torch.ones(3, 7), torch.ones(3, 7))
loss.backward()
assert torch.isfinite(x.grad).all()
print("ok")
"""


def test_bare_kernels_import_does_not_replace_the_ops():
    """With the repository root on sys.path (benchmarks, `python -m pytest` from the root),
    transformers imports `kernels` looking for Hugging Face's package: that must not re-register
    the `axpo::` ops (torch would replace them by name and the handles axpo.kernels holds would
    dangle: an INTERNAL ASSERT, std::bad_alloc or a segfault in a later call)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _SHADOW_CHECK, root], capture_output=True, text=True, cwd="/",
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_transformers_loads_from_the_repository_root():
    """From the repository root (`python -m axpo.eval ...` puts the working directory first on
    sys.path), `kernels` must be Hugging Face's package where it is installed: transformers
    depends on it and imports names from it while loading any model (it failed with
    "cannot import name 'CUDAProperties' from 'kernels' (.../kernels/__init__.py)"), and the
    axpo ops must still work."""
    import importlib.util
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys, kernels, torch\n"
            "from transformers import Qwen3VLForConditionalGeneration\n"
            "import axpo.kernels as ak\n"
            "x = torch.randn(3, 7, requires_grad=True)\n"
            "ak.clipped_policy_loss(x, x.detach(), torch.ones(3, 7), torch.ones(3, 7))[0].backward()\n"
            "print(kernels.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    here = os.path.join(root, "kernels")
    hf = importlib.util.find_spec("kernels", [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root])
    if hf is not None and not os.path.abspath(hf.origin or "").startswith(here):
        assert not out.stdout.strip().startswith(here), "bare `kernels` is this checkout's folder, not HF's"
