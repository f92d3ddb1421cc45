"""Device placement of the update's tensors (issue #19, item 4): everything the RL and supervised
losses build per micro-batch lives on the policy's device. Checked without a GPU: under
`FakeTensorMode` tensors created with device="cuda" are fake CUDA tensors (shapes and devices,
no data), so a tensor built on the CPU by mistake shows up as a CPU output or a device mix.
Forward only: autograd on fake CUDA tensors aborts a CPU-only build."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from axpo.update import _shifted, micro_batch_inputs, micro_batch_loss, supervised_loss, supervised_mask

LENS = [7, 5, 9]


def _on_cuda(t):
    return t is not None and t.device.type == "cuda"


def _lists(device):
    # Built with torch.full/ones directly on the device: `.to("cuda")` of a fake CPU tensor fails.
    masks = [torch.ones(n, device=device) for n in LENS]
    old = [torch.full((n,), -1.5, device=device) for n in LENS]
    adv = [torch.full((n,), a, device=device) for n, a in zip(LENS, (1.0, -0.5, 0.25))]
    ref = [torch.full((n,), -1.0, device=device) for n in LENS]
    return masks, old, adv, ref


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_rl_micro_batch_tensors_and_loss_on_the_device(agg, beta):
    with FakeTensorMode(), torch.no_grad():
        masks, old, adv, ref = _lists("cuda")
        L = max(LENS)
        inp = micro_batch_inputs([0, 1, 2], True, L, masks=masks, old=old, token_adv=adv,
                                 ref_logps=ref if beta > 0 else None, n_tokens=[n - 1.0 for n in LENS],
                                 device="cuda")
        for name in ("mask", "old_logp", "advantages") + (("ref_logp",) if beta > 0 else ()):
            t = getattr(inp, name)
            assert _on_cuda(t), (name, t.device)
            assert tuple(t.shape) == (3, L - 1), name
        assert inp.n_local == sum(LENS) - 3 and isinstance(inp.n_local, float)
        logp = torch.zeros(3, L - 1, device="cuda")   # the policy's log-probs, on the GPU
        loss, stats = micro_batch_loss(logp, inp, clip_low=0.2, clip_high=0.28, beta=beta, agg=agg,
                                       normalizer=float(sum(LENS)))
        assert _on_cuda(loss) and loss.dim() == 0
        for k, v in stats.items():
            assert _on_cuda(v), (k, v.device)


def test_dummy_micro_batch_is_zero_weighted_on_the_device():
    with FakeTensorMode(), torch.no_grad():
        masks, old, adv, _ = _lists("cuda")
        inp = micro_batch_inputs([1], False, LENS[1], masks=masks, old=old, token_adv=adv, ref_logps=None,
                                 n_tokens=[n - 1.0 for n in LENS], device="cuda")
        assert inp.n_local == 0.0 and _on_cuda(inp.mask) and inp.ref_logp is None


def test_supervised_mask_and_loss_on_the_device():
    masks = [[0, 0, 1, 1, 1], [0, 1, 1], [1, 1, 1, 1, 1, 1]]
    with FakeTensorMode(), torch.no_grad():
        L = 6
        mask = supervised_mask(masks, [0, 1, 2], True, L, dtype=torch.bfloat16, device="cuda")
        assert _on_cuda(mask) and mask.dtype == torch.bfloat16 and tuple(mask.shape) == (3, L - 1)
        logp = torch.zeros(3, L - 1, device="cuda", dtype=torch.bfloat16)
        loss = supervised_loss(logp, mask, g_tok=9.0)
        assert _on_cuda(loss)


def test_a_cpu_tensor_among_device_inputs_is_an_error():
    """A step's masks left on the host must fail loudly, not be copied per micro-batch."""
    with FakeTensorMode(), torch.no_grad():
        masks, old, adv, _ = _lists("cuda")
        masks[2] = torch.ones(LENS[2])   # on the CPU
        with pytest.raises(ValueError, match="row 2 are on cpu"):
            micro_batch_inputs([0, 2], True, max(LENS), masks=masks, old=old, token_adv=adv, ref_logps=None,
                               n_tokens=[n - 1.0 for n in LENS], device="cuda")


def test_values_on_the_cpu():
    """Real tensors: the layout is tokens 1..L-1 of each row, zero-padded; masks may be bool; the
    supervised mask equals the row lists."""
    x = [torch.arange(1.0, 5.0), torch.tensor([True, False, True]), torch.arange(10.0, 16.0)]
    out = _shifted(x, [0, 1, 2], 6, "cpu")
    assert out.dtype == torch.float32
    assert out.tolist() == [[2, 3, 4, 0, 0], [0, 1, 0, 0, 0], [11, 12, 13, 14, 15]]
    m = supervised_mask([[1, 0, 1], [1, 1, 1, 1, 0, 1]], [1, 0], True, 6, dtype=torch.float32, device="cpu")
    assert m.tolist() == [[1, 1, 1, 0, 1], [0, 1, 0, 0, 0]]
    assert supervised_mask([[1, 1]], [0], False, 2, dtype=torch.float32, device="cpu").tolist() == [[0]]
