"""benchmarks/axpo_bandit.py, the analytic miniature: its gradient is the token-mean surrogate's
(checked against torch autograd), its allocation is AXPO's selection rule, and a tiny sweep writes
its outputs and shows the two sanity properties: at skill 0 no resampled call can succeed; at skill
1 every arm learns to use the tool."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("axpo_bandit", ROOT / "benchmarks" / "axpo_bandit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["axpo_bandit"] = mod          # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gradient_matches_autograd(ab):
    rng = np.random.default_rng(0)
    S, N, B, R, M = 2, 5, 3, 6, 7
    b, u, theta = rng.normal(size=S), rng.normal(size=(S, N)), rng.normal(size=(S, N, M))
    q = np.stack([rng.permutation(N)[:B] for _ in range(S)])
    calls = rng.random((S, B, R)) < 0.6
    slots = rng.integers(0, M, size=(S, B, R))
    adv = rng.normal(size=(S, B, R))
    dec_w = rng.choice([1.0, 0.2], size=(S, B, R))
    arg_w = calls.astype(float)
    pc = 1 / (1 + np.exp(-(b[:, None] + u)))
    ps = np.exp(theta) / np.exp(theta).sum(-1, keepdims=True)
    pc_q = np.take_along_axis(pc, q, 1)
    ps_q = ps[np.arange(S)[:, None], q]
    got = ab.token_mean_grads(pc_q, ps_q, q, N, calls, slots, adv, dec_w, arg_w)

    tb, tu, tt = (torch.tensor(x, requires_grad=True) for x in (b, u, theta))
    sidx = torch.arange(S)[:, None]
    z = tb[:, None] + tu[sidx, torch.tensor(q)]                                  # [S, B]
    c = torch.tensor(calls, dtype=torch.float64)
    logsig = torch.nn.functional.logsigmoid
    logp_dec = c * logsig(z)[..., None] + (1 - c) * logsig(-z)[..., None]
    logp_slot = torch.log_softmax(tt[sidx, torch.tensor(q)], -1)                 # [S, B, M]
    logp_arg = torch.gather(logp_slot, 2, torch.tensor(slots))
    A, wd, wa = (torch.tensor(x) for x in (adv, dec_w, arg_w))
    ntok = (wd.sum((1, 2)) + wa.sum((1, 2)))[:, None, None]
    loss = (-(wd * A * logp_dec + wa * A * logp_arg) / ntok).sum()
    loss.backward()
    for name, t in (("b", tb), ("u", tu), ("theta", tt)):
        np.testing.assert_allclose(got[name], t.grad.numpy(), atol=1e-10, err_msg=name)


def test_allocation_is_axpo_selection(ab):
    # 4 groups; candidates (failed tool users) 3, 1, 0 (not triggered), 2; decision entropy
    # 0.2, 0.6, 0.9, 0.6; cap 2 per group, 4 slots: group 1 (0.6, 1 prefix), group 3 (0.6, tie
    # after group 1 in group order, 2), then group 0 gets the last one.
    triggered = np.array([[True, True, False, True]])
    n = ab._allocate(triggered, np.array([[3, 1, 0, 2]]), np.array([[0.2, 0.6, 0.9, 0.6]]), 4, 2)
    assert n.tolist() == [[1, 1, 0, 2]]


def test_tiny_sweep_outputs_and_sanity(ab, tmp_path):
    paths = ab.main(["--seeds", "4", "--steps", "60", "--skills", "0", "1", "--out", str(tmp_path),
                     "--name", "tiny"])
    assert {p.name for p in paths} == {"tiny.md", "tiny.json", "tiny.png"} and all(p.stat().st_size for p in paths)
    import json

    res = {(r["init_skill"], r["arm"]): r for r in json.loads((tmp_path / "tiny.json").read_text())["results"]}
    for arm in ("axpo", "axpo_once"):
        # Skill 0: the right slot has probability exactly 0, so no resampled call ever succeeds,
        # though groups do trigger and branches are spent.
        assert res[(0.0, arm)]["trigger_rate"] > 0 and res[(0.0, arm)]["resample_success"] == 0.0
        assert res[(0.0, arm)]["accuracy"][0] == pytest.approx(0.25, abs=0.01)   # a direct guess
    for arm in ab.ARMS:
        # Skill 1: a call is right 95% of the time against a 25% guess; every arm learns to act.
        assert res[(1.0, arm)]["accuracy"][0] > 0.85 and res[(1.0, arm)]["tool_use"][0] > 0.85, arm
    assert math.isnan(res[(1.0, "grpo")]["resample_success"])                    # no extra rollouts
    assert "| 0 |" in (tmp_path / "tiny.md").read_text()
