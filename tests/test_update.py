"""The RL update on hand-made trajectories with the tiny model (single process): the step does not
depend on how tokens are split into micro-batches, and a NaN loss skips the step without touching
the weights."""

import copy

import pytest
import torch

from axpo.agent.format import AgentFormat
from axpo.agent.trajectory import Trajectory
from axpo.distributed import Dist
from axpo.models import build_tiny_model
from axpo.policy import PolicyModel
from axpo.update import policy_update


def _trajs(n_tokens=(20, 33, 27, 41)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(n_tokens):
        toks = torch.randint(0, 600, (n,), generator=g).tolist()
        out.append(Trajectory(uid=f"t{i}", sample_uid="q", group=0, prompt_len=5, tokens=toks,
                              loss_mask=[0] * 5 + [1] * (n - 5), logprobs=[0.0] * n, entropies=[0.0] * n))
    return out


def _run(policy, trajs, adv, budget, agg="token-mean"):
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    fmt = AgentFormat(_run.processor)
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    tok_adv = [torch.full((len(t.tokens),), a) for t, a in zip(trajs, adv)]
    return policy_update(policy, opt, trajs, tok_adv, masks, fmt=fmt, d=Dist(), budget=budget,
                         temperature=1.0, clip_low=0.2, clip_high=0.28, beta=0.0, agg=agg, epochs=1,
                         grad_clip=1e9)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_split_does_not_change_the_step(tiny_processor, agg):
    _run.processor = tiny_processor
    base = PolicyModel(build_tiny_model(seed=1, processor=tiny_processor))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    trajs = _trajs()
    adv = [1.0, -0.5, 0.25, -1.0]
    sa = _run(a, trajs, adv, budget=10_000, agg=agg)   # one micro-batch
    sb = _run(b, trajs, adv, budget=45, agg=agg)       # one row per micro-batch
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5, abs=1e-7)
    changed = False
    for (n, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), base.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
        changed |= not torch.equal(pa, p0)
    assert changed


def test_nan_loss_skips_step_and_keeps_weights(tiny_processor):
    _run.processor = tiny_processor
    policy = PolicyModel(build_tiny_model(seed=2, processor=tiny_processor))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    stats = _run(policy, _trajs(), [float("nan"), 1.0, 0.0, -1.0], budget=10_000)
    assert stats["skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_update_moves_probability_toward_positive_advantage(tiny_processor):
    """Direction check of the whole update (loss sign, masks, shifts): one step makes the rollout
    with positive advantage more likely and the one with negative advantage less likely."""
    _run.processor = tiny_processor
    policy = PolicyModel(build_tiny_model(seed=3, processor=tiny_processor))
    trajs = _trajs((30, 30))
    fmt = AgentFormat(tiny_processor)
    from axpo.update import old_logprobs

    rows = [{"tokens": t.tokens, "pixel_values": [], "grids": []} for t in trajs]

    def seq_logp():
        lp, _ = old_logprobs(policy, rows, fmt, 10_000, 1.0, Dist())
        return [float((lp_i * torch.tensor(t.loss_mask, dtype=torch.float32)).sum()) for lp_i, t in zip(lp, trajs)]

    before = seq_logp()
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    adv = [torch.full((30,), 1.0), torch.full((30,), -1.0)]
    policy_update(policy, opt, trajs, adv, masks, fmt=fmt, d=Dist(), budget=10_000, temperature=1.0,
                  clip_low=0.2, clip_high=0.28, beta=0.0, agg="token-mean", epochs=1, grad_clip=1e9)
    after = seq_logp()
    assert after[0] > before[0] and after[1] < before[1]


def test_kl_to_reference_policy(tiny_processor):
    """beta > 0: against an identical reference the KL is 0 and the step equals beta = 0's; against
    a different reference the KL is positive and changes the step."""
    _run.processor = tiny_processor
    fmt = AgentFormat(tiny_processor)
    base = PolicyModel(build_tiny_model(seed=4, processor=tiny_processor))
    other = PolicyModel(build_tiny_model(seed=5, processor=tiny_processor))
    trajs = _trajs((25, 31))
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    adv = [torch.full((len(t.tokens),), a) for t, a in zip(trajs, (1.0, -1.0))]

    def step(beta, ref):
        pol = copy.deepcopy(base)
        st = policy_update(pol, torch.optim.SGD(pol.parameters(), lr=0.1), trajs, adv, masks, fmt=fmt,
                           d=Dist(), budget=10_000, temperature=1.0, clip_low=0.2, clip_high=0.28,
                           beta=beta, agg="token-mean", epochs=1, grad_clip=1e9, ref_policy=ref)
        return st, pol

    s0, p0 = step(0.0, None)
    s_same, p_same = step(0.5, copy.deepcopy(base))
    s_other, p_other = step(0.5, other)
    assert abs(s_same["kl"]) < 1e-6 and s_other["kl"] > 1e-3
    for a, b, c in zip(p0.parameters(), p_same.parameters(), p_other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, c) for a, c in zip(p0.parameters(), p_other.parameters()))
    with pytest.raises(ValueError, match="reference policy"):
        step(0.5, None)


def _count_forwards(policy):
    calls = []
    fwd = policy.forward

    def counted(batch, **kw):
        calls.append(batch.input_ids.shape[0])
        return fwd(batch, **kw)

    policy.forward = counted
    return calls


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_one_epoch_skips_the_old_logprob_pass_with_the_same_step(tiny_processor, agg):
    """ppo_epochs=1: the old log-probs are the update forward's own (ratio exactly 1), so the
    separate no-grad pass is not run; loss, entropy, ratio and the updated weights equal the
    step with the pass (old_pass=True)."""
    _run.processor = tiny_processor
    fmt = AgentFormat(tiny_processor)
    base = PolicyModel(build_tiny_model(seed=6, processor=tiny_processor))
    trajs = _trajs((20, 33, 27, 41, 90))
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    adv = [torch.full((len(t.tokens),), a) for t, a in zip(trajs, (1.0, -0.5, 0.25, -1.0, 0.5))]
    out = {}
    for old_pass in (True, None):
        pol = copy.deepcopy(base)
        calls = _count_forwards(pol)
        st = policy_update(pol, torch.optim.SGD(pol.parameters(), lr=1.0), trajs, adv, masks, fmt=fmt, d=Dist(),
                           budget=200, temperature=1.0, clip_low=0.2, clip_high=0.28, beta=0.0, agg=agg,
                           epochs=1, grad_clip=1e9, old_pass=old_pass)
        out[old_pass] = st, pol, calls
    (s_ref, p_ref, c_ref), (s, p, c) = out[True], out[None]
    assert sum(c) == len(trajs) and sum(c_ref) == 2 * len(trajs)   # one forward per row, not two
    for k in ("loss", "entropy", "ratio", "clip_frac", "grad_norm", "trained_tokens"):
        assert s[k] == pytest.approx(s_ref[k], rel=1e-5, abs=1e-7), k
    assert s["ratio"] == 1.0 and s["clip_frac"] == 0.0 and s["entropy"] > 0
    for (n, a), b, b0 in zip(p.named_parameters(), p_ref.parameters(), base.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(a, b0) for a, b0 in zip(p.parameters(), base.parameters()))


def test_two_epochs_and_dropout_keep_the_old_logprob_pass(tiny_processor):
    _run.processor = tiny_processor
    fmt = AgentFormat(tiny_processor)
    trajs = _trajs((20, 33))
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    adv = [torch.full((len(t.tokens),), a) for t, a in zip(trajs, (1.0, -1.0))]
    for epochs, dropout in ((2, 0.0), (1, 0.1)):
        pol = PolicyModel(build_tiny_model(seed=7, processor=tiny_processor))
        if dropout:
            pol.hf.model.language_model.layers[0].self_attn.attention_dropout = dropout
        calls = _count_forwards(pol)
        policy_update(pol, torch.optim.SGD(pol.parameters(), lr=0.1), trajs, adv, masks, fmt=fmt, d=Dist(),
                      budget=10_000, temperature=1.0, clip_low=0.2, clip_high=0.28, beta=0.0, agg="token-mean",
                      epochs=epochs, grad_clip=1e9)
        assert len(calls) == 1 + epochs, (epochs, dropout)   # the old pass, then one forward per epoch


def test_micro_batches_group_by_length_under_the_budget():
    from axpo.batching import micro_batches

    # AXPO mode's mix: many one-turn rows and a few long two-turn rows.
    lengths = [28, 32, 59, 86] + [89] * 33 + [90] * 23 + [175, 196, 207, 217]
    groups = micro_batches(lengths, 1 << 16)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert len(groups) == 2 and padded == 60 * 90 + 4 * 217          # not 64 x 217 = 13,888
    # Near-equal lengths stay together (a split would save less than a pass costs).
    assert len(micro_batches([80] * 10 + [90] * 54, 1 << 16)) == 1
    for budget in (45, 100, 500, 2000):
        gs = micro_batches(lengths, budget)
        assert sorted(i for g in gs for i in g) == list(range(len(lengths)))
        assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget for g in gs)
    assert micro_batches([], 100) == [] and micro_batches([500, 3], 100) == [[1], [0]]


def test_right_padded_batch_without_mask_equals_masked_forward(tiny_processor):
    """pack()'s batches run causal attention without the padding mask: real positions' log-probs
    and the gradients of a masked loss equal the masked forward's, images included."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from axpo.policy import pack

    fmt = AgentFormat(tiny_processor)
    policy = PolicyModel(build_tiny_model(seed=8, processor=tiny_processor))
    g = torch.Generator().manual_seed(1)
    rows = []
    for i, n in enumerate((7, 30, 15)):
        img = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (28 + 14 * i, 42, 3), dtype=np.uint8))]
        ch = fmt.prompt(f"question {i}", img if i != 1 else [], None)
        rows.append({"tokens": ch.ids + torch.randint(10, 500, (n,), generator=g).tolist(),
                     "pixel_values": ch.pixel_values, "grids": ch.grids})
    batch = pack(rows, fmt.pad, fmt.image_pad, [0, 1, 2])
    assert batch.right_padded and batch.pixel_values is not None
    assert len({len(r["tokens"]) for r in rows}) == 3                # real padding
    real = batch.attention_mask[:, 1:].float()
    grads = []
    for b in (batch, dataclasses.replace(batch, right_padded=False)):
        policy.zero_grad()
        lp, ent = policy(b, return_entropy=True)
        ((lp * real).sum() + (ent * real).sum()).backward()
        grads.append(([p.grad.clone() for p in policy.parameters() if p.grad is not None], lp * real, ent * real))
    (ga, lpa, ea), (gb, lpb, eb) = grads
    torch.testing.assert_close(lpa, lpb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-5)
    assert len(ga) == len(gb) and len(ga) > 0
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_head_at_kept_positions_equals_the_full_head(tiny_processor):
    """forward(keep=trained positions) runs the LM head there only: those log-probs/entropies and
    the gradients of a loss over them equal the full head's; every other output is 0."""
    from axpo.policy import pack
    from axpo.update import kept_positions

    fmt = AgentFormat(tiny_processor)
    policy = PolicyModel(build_tiny_model(seed=9, processor=tiny_processor))
    trajs = _trajs((20, 33, 27))
    rows = [{"tokens": t.tokens, "pixel_values": [], "grids": []} for t in trajs]
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    masks[1][12:20] = 0                              # a tool output inside a completion
    batch = pack(rows, fmt.pad, fmt.image_pad, [0, 1, 2])
    L = batch.input_ids.shape[1]
    keep = kept_positions(masks, [0, 1, 2], L, "cpu")
    m = torch.stack([torch.nn.functional.pad(x[1:], (0, L - x.shape[0])) for x in masks])
    assert keep.numel() == int(m.sum()) and torch.equal(m.reshape(-1).nonzero().squeeze(1), keep)
    out = []
    for k in (None, keep):
        policy.zero_grad()
        lp, ent = policy(batch, return_entropy=True, keep=k)
        ((lp * m).sum() * 0.7 - (ent * m).sum() * 0.1).backward()
        out.append((lp, ent, [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
    (lp0, e0, g0), (lp1, e1, g1) = out
    torch.testing.assert_close(lp1 * m, lp0 * m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e1 * m, e0 * m, rtol=1e-6, atol=1e-6)
    assert torch.all(lp1[m == 0] == 0) and torch.all(e1[m == 0] == 0)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _group_trajs(n_groups=3, per_group=4, seed=0):
    """Groups of trajectories sharing a prompt (a GRPO step's shape), completions of mixed length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for q in range(n_groups):
        P = 12 + q
        prompt = torch.randint(0, 600, (P,), generator=g).tolist()
        for k in range(per_group):
            n = int(torch.randint(1, 30, (1,), generator=g))
            toks = prompt + torch.randint(0, 600, (n,), generator=g).tolist()
            out.append(Trajectory(uid=f"t{q}_{k}", sample_uid=f"q{q}", group=q, prompt_len=P, tokens=toks,
                                  loss_mask=[0] * P + [1] * n, logprobs=[0.0] * len(toks),
                                  entropies=[0.0] * len(toks)))
    return out


def test_shared_prefix_forward_equals_one_row_per_trajectory(tiny_processor):
    """Two-stage forward (each group's prompt once, then every row's completion against its
    group's prefix KV): the kept log-probs/entropies and the gradients equal the plain forward's."""
    from axpo.policy import pack, shared_prefix
    from axpo.update import _rows, kept_positions

    fmt = AgentFormat(tiny_processor)
    policy = PolicyModel(build_tiny_model(seed=10, processor=tiny_processor))
    trajs = _group_trajs()
    trajs[5].tokens[-1] = trajs[4].tokens[-1]          # members may share more than the prompt
    rows = _rows(trajs)
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    idx = list(range(len(rows)))
    batch = pack(rows, fmt.pad, fmt.image_pad, idx)
    L = batch.input_ids.shape[1]
    keep = kept_positions(masks, idx, L, "cpu")
    sp = shared_prefix(rows, keep, L, fmt.pad)
    assert sp is not None and sp.prefix_ids.shape[0] == 3 and sp.tokens < batch.input_ids.numel()
    assert shared_prefix(rows, keep, L, fmt.pad, min_saved=10_000) is None
    m = torch.stack([torch.nn.functional.pad(x[1:], (0, L - x.shape[0])) for x in masks])
    out = []
    for s in (None, sp):
        policy.zero_grad()
        lp, ent = policy(batch, return_entropy=True, keep=keep, shared=s)
        ((lp * m).sum() - 0.3 * (ent * m).sum()).backward()
        out.append((lp, ent, [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
    (lp0, e0, g0), (lp1, e1, g1) = out
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):   # float order differs (a prefix's gradient is summed over its rows first)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_update_with_shared_prefixes_equals_the_plain_update(tiny_processor, monkeypatch):
    import axpo.update as up

    _run.processor = tiny_processor
    base = PolicyModel(build_tiny_model(seed=11, processor=tiny_processor))
    trajs = _group_trajs(seed=1)
    adv = [float(i % 4) - 1.5 for i in range(len(trajs))]
    calls = []
    real = up.shared_prefix

    def counted(*a, **k):
        k["min_saved"] = 0
        sp = real(*a, **k)
        calls.append(sp is not None)
        return sp

    monkeypatch.setattr(up, "shared_prefix", counted)
    a = copy.deepcopy(base)
    sa = _run(a, trajs, adv, budget=10_000)
    assert calls == [True]
    monkeypatch.setattr(up, "shared_prefix", lambda *a, **k: None)
    b = copy.deepcopy(base)
    sb = _run(b, trajs, adv, budget=10_000)
    for k in ("loss", "entropy", "grad_norm"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-5, abs=1e-7), k
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
