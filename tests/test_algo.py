"""AXPO's trigger, candidates, selection rules, budget and credit on hand-built groups; expected
values are worked out by hand in the comments."""

import math
import random
import statistics

import pytest
import torch

from axpo.agent.trajectory import ToolCallRecord, Trajectory
from axpo.algo.credit import loss_masks, sequence_advantages, token_advantages
from axpo.algo.groups import group_rollouts
from axpo.algo.selection import candidates, score, select

P = 3  # prompt length of every hand-built rollout


def mk(group, reward, *, calls=(), ents=None, n=12, uid=None, tokens=None, branch_set=None, cut=None,
       parent=None):
    """A rollout of n tokens: P prompt tokens, then sampled ones. `calls` are tool-call starts."""
    ents = ents if ents is not None else [0.5] * n
    t = Trajectory(uid=uid or f"g{group}-{random.random()}", sample_uid=f"q{group}", group=group, prompt_len=P,
                   tokens=tokens or list(range(100, 100 + n)), loss_mask=[0] * P + [1] * (n - P),
                   logprobs=[0.0] * n, entropies=list(ents), reward=reward, branch_set=branch_set, cut=cut,
                   parent_uid=parent)
    t.tool_calls = [ToolCallRecord(start=c, end=c + 2, name="python", arguments={}, error=None) for c in calls]
    return t


# -- trigger --------------------------------------------------------------------------------

def test_trigger_needs_all_tool_users_wrong():
    g = group_rollouts([mk(0, 0.0, calls=[5]), mk(0, 0.0, calls=[6]), mk(0, 1.0)])
    assert g[0].triggered            # tool users all wrong; the no-tool one being right does not matter
    g = group_rollouts([mk(0, 0.0, calls=[5]), mk(0, 1.0, calls=[6])])
    assert not g[0].triggered        # one tool user succeeded
    g = group_rollouts([mk(0, 0.0), mk(0, 0.0)])
    assert not g[0].triggered        # nobody used a tool: nothing to resample
    # Branches never count toward the trigger.
    g = group_rollouts([mk(0, 0.0, calls=[5]), mk(0, 1.0, calls=[5], parent="x", branch_set=0, cut=5)])
    assert g[0].triggered and len(g[0].rollouts) == 1


# -- candidates and selection rules ---------------------------------------------------------

def test_candidates_first_vs_every_and_dedup():
    a = mk(0, 0.0, calls=[5, 9], tokens=list(range(12)))
    b = mk(0, 0.0, calls=[5], tokens=list(range(12)))  # same prefix before 5 as `a`: deduplicated
    g = group_rollouts([a, b])[0]
    rng = random.Random(0)
    first = candidates(g, cut_mode="first", rule="window_entropy", window=32, rng=rng)
    assert [(c.traj is a, c.cut) for c in first] == [(True, 5)]
    every = candidates(g, cut_mode="every", rule="window_entropy", window=32, rng=rng)
    assert sorted(c.cut for c in every) == [5, 9]
    with pytest.raises(ValueError, match="algo.cut"):
        candidates(g, cut_mode="bogus", rule="window_entropy", window=32, rng=rng)


def test_selection_rules_by_hand():
    # Sampled tokens are positions 3..11; cut at 7 -> tokens 3,4,5,6 before the cut.
    ents = [0, 0, 0, 0.1, 0.2, 0.9, 0.7, 0.3, 0, 0, 0, 0]
    t = mk(0, 0.0, calls=[7], ents=ents)
    rng = random.Random(0)
    assert score(t, 7, "window_entropy", 2, rng) == pytest.approx((0.9 + 0.7) / 2)  # last W=2 before cut
    assert score(t, 7, "prefix_entropy", 2, rng) == pytest.approx((0.1 + 0.2 + 0.9 + 0.7) / 4)
    assert score(t, 7, "call_entropy", 2, rng) == pytest.approx(0.3)                  # at the <tool_call>
    assert score(t, 7, "lowest", 2, rng) == pytest.approx(-0.8)
    r = score(t, 7, "random", 2, random.Random(5))
    assert r == random.Random(5).random()
    with pytest.raises(ValueError, match="algo.selection"):
        score(t, 7, "nope", 2, rng)


def test_selection_order_and_budget_across_groups():
    def roll(group, w):  # window entropy w right before the cut at 6
        return mk(group, 0.0, calls=[6], ents=[0, 0, 0, w, w, w, 0, 0, 0, 0, 0, 0],
                  tokens=[group, w * 100] + list(range(10)))

    groups = group_rollouts([roll(0, 0.1), roll(0, 0.9), roll(0, 0.5), roll(1, 0.7), roll(1, 0.2),
                             mk(2, 1.0, calls=[6])])  # group 2 not triggered
    rng = random.Random(0)
    kw = dict(cut_mode="first", rule="window_entropy", window=3, per_group=2, branches=4, rng=rng)
    # Per group top 2: g0 -> 0.9, 0.5; g1 -> 0.7, 0.2. Budget 12 extra / K=4 -> 3 prefixes: 0.9, 0.7, 0.5.
    chosen = select(groups, max_extra=12, **kw)
    assert [round(c.score, 3) for c in chosen] == [0.9, 0.7, 0.5]
    assert [c.traj.group for c in chosen] == [0, 1, 0]
    # A budget below one branch set selects nothing.
    assert select(groups, max_extra=3, **kw) == []
    # "lowest": least uncertain first.
    low = select(groups, max_extra=8, **{**kw, "rule": "lowest"})
    assert [round(c.cut_entropy, 3) for c in low] == [0.1, 0.2]


# -- credit --------------------------------------------------------------------------------

def _soft_group():
    base = [mk(0, 0.0, calls=[6], uid="a"), mk(0, 0.0, calls=[6], uid="b")]
    br = [mk(0, 1.0, calls=[6], uid="a-b0.0", branch_set=0, cut=6, parent="a"),
          mk(0, 0.0, calls=[6], uid="a-b0.1", branch_set=0, cut=6, parent="a")]
    return base + br


def test_soft_credit_renormalises_over_enlarged_group():
    trajs = _soft_group()
    adv = sequence_advantages(trajs, credit="soft")
    # rewards [0,0,1,0]: mean 0.25, Bessel std = sqrt((3*0.25^2 + 0.75^2)/3) = 0.5
    assert adv.tolist() == pytest.approx([-0.5, -0.5, 1.5, -0.5], abs=1e-4)
    tok = token_advantages(trajs, adv, credit="soft")
    assert torch.allclose(tok[2], torch.full((12,), float(adv[2])))  # prefix tokens included
    masks = loss_masks(trajs, credit="soft", trained=[True] * 4)
    assert all(m[P:].sum() == 12 - P for m in masks)


def test_subgroup_credit_normalises_branches_against_siblings():
    trajs = _soft_group()
    adv = sequence_advantages(trajs, credit="subgroup")
    # base [0,0]: zero variance -> 0; branches [1,0]: mean 0.5, std sqrt(0.5) -> +-0.7071
    assert adv.tolist() == pytest.approx([0.0, 0.0, 0.7071, -0.7071], abs=1e-3)


@pytest.mark.parametrize("sqrt_weight", [False, True])
def test_tree_credit_prefix_once_with_mean(sqrt_weight):
    trajs = _soft_group()
    adv = sequence_advantages(trajs, credit="tree")
    assert adv.tolist() == pytest.approx([-0.5, -0.5, 1.5, -0.5], abs=1e-4)  # same statistics as soft
    tok = token_advantages(trajs, adv, credit="tree", tree_sqrt_weight=sqrt_weight)
    masks = loss_masks(trajs, credit="tree", trained=[True] * 4)
    mean = (1.5 - 0.5) / 2 * (math.sqrt(2) if sqrt_weight else 1.0)
    # First branch: prefix [P, cut) carries the mean once; its own tokens its own advantage.
    assert tok[2][P:6].tolist() == pytest.approx([mean] * 3, abs=1e-4)
    assert tok[2][6:].tolist() == pytest.approx([1.5] * 6, abs=1e-4)
    assert masks[2][P:6].tolist() == [1, 1, 1]
    # Second branch: prefix masked out (already counted), branch part keeps -0.5.
    assert masks[3][P:6].tolist() == [0, 0, 0] and masks[3][6:].sum() == 6
    assert tok[3][6:].tolist() == pytest.approx([-0.5] * 6, abs=1e-4)
    # Base rollouts are untouched.
    assert masks[0][P:].sum() == 12 - P


def test_axpo_off_equals_plain_grpo():
    rewards = {0: [1.0, 0.0, 0.0, 1.0, 1.0], 3: [0.0, 0.0, 0.0], 7: [1.0, 0.0]}
    trajs = [mk(g, r) for g, rs in rewards.items() for r in rs]
    adv = sequence_advantages(trajs, credit="soft")
    expected = []
    for g, rs in rewards.items():
        m, s = statistics.mean(rs), statistics.stdev(rs)
        expected += [(r - m) / (s + 1e-6) for r in rs]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)


def test_masked_truncations_leave_statistics():
    trajs = [mk(0, 1.0), mk(0, 0.0), mk(0, 0.0)]
    adv = sequence_advantages(trajs, credit="soft", trained=[True, True, False])
    # Only [1, 0] count: mean 0.5, std 0.7071 -> +-0.7071; the masked one gets 0.
    assert adv.tolist() == pytest.approx([0.7071, -0.7071, 0.0], abs=1e-3)
    masks = loss_masks(trajs, credit="soft", trained=[True, True, False])
    assert masks[2].sum() == 0
