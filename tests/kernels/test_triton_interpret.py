"""The Triton kernels themselves, run on CPU through Triton's interpreter (TRITON_INTERPRET=1).

`triton.jit` decides compile-or-interpret when triton is imported, for Triton's own helpers too,
so the variable has to be set before the first `import triton` of the process. Setting it in this
pytest process would change triton for every other test module (and the ahead-of-time compile
test needs the compiled form), so the main run has a single driver test that re-runs this file in
a child pytest with TRITON_INTERPRET=1 and AXPO_KERNEL_BACKEND=triton; the cases below exist only
in that child. Shapes are small (the interpreter runs numpy per program instance).
"""

import os
import re
import subprocess
import sys

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _repo_root():
    d = os.path.dirname(os.path.abspath(__file__))
    while not os.path.exists(os.path.join(d, "pyproject.toml")):
        d = os.path.dirname(d)
    return d


if not INTERPRETING:

    def test_triton_kernels_under_interpreter():
        from axpo.kernels import HAS_TRITON

        if not HAS_TRITON:
            pytest.skip("triton is not importable: the Triton kernels cannot be exercised")
        env = dict(os.environ, TRITON_INTERPRET="1", AXPO_KERNEL_BACKEND="triton")
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
            env=env, capture_output=True, text=True, cwd=_repo_root(), timeout=600,
        )
        tail = r.stdout[-4000:] + r.stderr[-2000:]
        assert r.returncode == 0, tail
        m = re.search(r"(\d+) passed", r.stdout)
        assert m and int(m.group(1)) >= 40, f"too few interpreter cases ran:\n{tail}"
        assert " skipped" not in r.stdout.splitlines()[-1], tail
        print(r.stdout.strip().splitlines()[-1])

    def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
        import torch

        from axpo.kernels import HAS_TRITON, logprob_entropy

        if not HAS_TRITON:
            pytest.skip("triton is not importable")
        monkeypatch.setenv("AXPO_KERNEL_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            logprob_entropy(torch.randn(2, 5), torch.tensor([0, 1]))

    def test_backend_switch(monkeypatch):
        import torch

        from axpo.kernels import backend_for

        x = torch.zeros(1)
        monkeypatch.setenv("AXPO_KERNEL_BACKEND", "auto")
        assert backend_for(x) == "torch"  # CPU tensors
        monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")
        assert backend_for(x) == "torch"
        monkeypatch.setenv("AXPO_KERNEL_BACKEND", "cuda")
        with pytest.raises(ValueError):
            backend_for(x)

else:
    import itertools

    import torch
    from kernels_testlib import (
        check_group_advantages,
        check_grouped,
        check_linear,
        check_linear_policy_loss,
        check_logprob_entropy,
        check_policy_loss,
        loss_inputs,
        make_logits,
        pick_targets,
    )

    from axpo.kernels import backend_for, clipped_policy_loss, grouped_policy_loss

    def test_really_interpreting():
        import importlib

        from triton.runtime.interpreter import InterpretedFunction

        lpe = importlib.import_module("axpo.kernels.logprob_entropy")
        assert isinstance(lpe._lpe_fwd_kernel, InterpretedFunction)
        assert backend_for(torch.zeros(1)) == "triton"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("V,N", [(123, 33), (2053, 7), (517, 1)])
    def test_lpe_shapes(V, N, dtype):
        x = make_logits(N, V, dtype)
        check_logprob_entropy(x, pick_targets((N,), V, "randn"), 1.0, "both", masked_rows=(1,) if N > 1 else ())

    @pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
    @pytest.mark.parametrize("grad_mode", ["logp", "entropy", "both"])
    def test_lpe_grads(temperature, grad_mode):
        x = make_logits(6, 2053, torch.bfloat16, seed=3)
        check_logprob_entropy(x, pick_targets((6,), 2053, "randn"), temperature, grad_mode, masked_rows=(0, 4))

    ADVERSARIAL = [("tiles", torch.float32), ("tiles", torch.bfloat16), ("neginf", torch.float32),
                   ("negative", torch.float32), ("fp16max", torch.float16)]

    @pytest.mark.parametrize("kind,dtype", ADVERSARIAL)
    def test_lpe_adversarial(kind, dtype):
        V = 2053  # several 4096-wide tiles would need V > 4096; 2053 still ends in a partial tile
        x = make_logits(5, V, dtype, kind=kind)
        check_logprob_entropy(x, pick_targets((5,), V, kind), 0.7, "both", masked_rows=(3,))

    def test_lpe_multi_tile_online_softmax(monkeypatch):
        """Force 128-wide tiles so the running max / rescale path runs over many tiles."""
        import importlib

        lpe = importlib.import_module("axpo.kernels.logprob_entropy")
        monkeypatch.setattr(lpe, "FWD_BLOCK_V", 128)
        monkeypatch.setattr(lpe, "BWD_BLOCK_V", 128)
        for kind in ("tiles", "neginf", "randn"):
            x = make_logits(4, 1031, torch.float32, kind=kind)
            check_logprob_entropy(x, pick_targets((4,), 1031, kind), 1.5, "both", masked_rows=(2,))

    def test_lpe_strided_view():
        x = make_logits(8, 517, torch.bfloat16, shifted=True)
        assert not x.is_contiguous()
        check_logprob_entropy(x, pick_targets(x.shape[:-1], 517, "randn"), 1.5, "both", masked_rows=(2,))

    def test_lpe_garbage_masked_row_and_single_finite():
        from axpo.kernels import logprob_entropy

        x = torch.full((3, 300), float("-inf"))
        x[0, 5] = 2.0
        x[1] = torch.randn(300)
        x[2] = float("nan")
        xg = x.clone().requires_grad_()
        lp, ent = logprob_entropy(xg, torch.tensor([5, 9, -100]))
        (lp.sum() + ent.sum()).backward()
        assert lp[0] == 0 and ent[0] == 0 and lp[2] == 0 and ent[2] == 0
        assert torch.isfinite(xg.grad).all() and (xg.grad[2] == 0).all() and (xg.grad[0] == 0).all()

    @pytest.mark.parametrize("dtype,bias,chunk",
                             [(torch.float32, True, 4), (torch.bfloat16, False, 5), (torch.float32, False, None)])
    def test_linear(dtype, bias, chunk):
        check_linear(13, 16, 517, dtype, bias=bias, temperature=0.7, grad_mode="both", chunk_tokens=chunk,
                     masked_rows=(3,))

    @pytest.mark.parametrize("dtype,adv_kind,agg", [(torch.float32, "seq", "token-mean"),
                                                    (torch.bfloat16, "token", "seq-mean-token-mean")])
    def test_linear_policy_loss(dtype, adv_kind, agg):
        """The fused head + loss on the Triton backend: row kernels and the loss kernel per chunk."""
        check_linear_policy_loss(2, 5, 16, 517, dtype, bias=True, temperature=0.7, adv_kind=adv_kind, agg=agg,
                                 beta=0.04, with_ref=True, chunk_tokens=3, masked_targets=(4,))

    @pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
    @pytest.mark.parametrize("with_sub", [False, True])
    def test_group_advantages(mode, with_sub):
        check_group_advantages(mode, with_sub)

    def test_segment_longer_than_block():
        """A group larger than the stats kernel's 256-wide block loops over several blocks."""
        from axpo.kernels import group_advantages
        from axpo.kernels.reference import group_advantages_ref

        r = torch.randn(700) + 100.0
        ids = torch.randint(0, 2, (700,)) * 13
        ref = group_advantages_ref(r.double(), ids)
        torch.testing.assert_close(group_advantages(r, ids).double(), ref, rtol=1e-4, atol=1e-4)

    OPTIONS = list(itertools.product(["seq", "token"], ["token-mean", "seq-mean-token-mean"],
                                     [(0.2, 0.2), (0.1, 0.35)]))

    @pytest.mark.parametrize("adv_kind,agg,clips", OPTIONS)
    @pytest.mark.parametrize("beta,with_ref", [(0.0, False), (0.05, True)])
    def test_clipped_loss(adv_kind, agg, clips, beta, with_ref):
        check_policy_loss(adv_kind, agg, beta, with_ref, *clips)

    def test_loss_long_rows_multiple_blocks():
        check_policy_loss("token", "seq-mean-token-mean", 0.05, True, 0.2, 0.28, R=5, T=700)

    def test_loss_triton_equals_torch_path(monkeypatch):
        logp, old, ref, mask = loss_inputs(R=7, T=300)
        adv = torch.randn(7)
        a = clipped_policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.03)
        monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")
        b = clipped_policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.03)
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
        for k in a[1]:
            torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
    @pytest.mark.parametrize("with_sub", [False, True])
    @pytest.mark.parametrize("agg,beta", [("token-mean", 0.0), ("seq-mean-token-mean", 0.04)])
    def test_grouped_equals_composed(mode, with_sub, agg, beta):
        check_grouped(mode, with_sub, agg, beta)

    def test_grouped_fused_kernel_equals_torch_path(monkeypatch):
        logp, old, ref, mask = loss_inputs(R=6, T=40)
        r = torch.randn(6)
        ids = torch.tensor([1, 1, 1, 5, 5, 9])
        x = logp.clone().requires_grad_()
        la, sa = grouped_policy_loss(x, old, mask, r, ids, ref_logp=ref, beta=0.02)
        (ga,) = torch.autograd.grad(la, x)
        monkeypatch.setenv("AXPO_KERNEL_BACKEND", "torch")
        x = logp.clone().requires_grad_()
        lb, sb = grouped_policy_loss(x, old, mask, r, ids, ref_logp=ref, beta=0.02)
        (gb,) = torch.autograd.grad(lb, x)
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)
