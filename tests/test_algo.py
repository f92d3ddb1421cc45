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


# -- issue #16: deviations found in review --------------------------------------------------

def _family(group, parent_uid, cut, k, reward=0.0, set_id=0, **kw):
    return [mk(group, reward, calls=[cut], uid=f"{parent_uid}-b{set_id}.{i}", branch_set=set_id, cut=cut,
               parent=parent_uid, **kw) for i in range(k)]


def _collapse_group():
    """A group of 8: one no-tool success, three no-tool failures, four failed tool users (call at
    6); two of the tool users are parents of a set of K=4 failed branches each."""
    base = [mk(0, 1.0, uid="ok")] + [mk(0, 0.0, uid=f"n{i}") for i in range(3)]
    base += [mk(0, 0.0, calls=[6], uid=f"t{i}") for i in range(4)]
    branches = _family(0, "t0", 6, 4, set_id=0) + _family(0, "t1", 6, 4, set_id=1)
    return base, branches


def _tool_prefix_push(trajs, *, prefix_weight="per_sequence", pos=4):
    """Sum over tool-using sequences of advantage x loss weight at a tool-think token (before the
    cut): the push the shared tool-think gets from this group."""
    trained = [True] * len(trajs)
    adv = sequence_advantages(trajs, credit="soft", trained=trained)
    tok = token_advantages(trajs, adv, credit="soft", trained=trained)
    masks = loss_masks(trajs, credit="soft", trained=trained, prefix_weight=prefix_weight)
    return sum(float(tok[i][pos] * masks[i][pos]) for i, t in enumerate(trajs) if t.used_tool), masks


def test_prefix_weight_per_sequence_vs_once_on_collapse_group():
    base, branches = _collapse_group()
    # GRPO: rewards [1, 0 x 7]: mean 1/8, Bessel std sqrt(1/8) -> failure -0.3536; 4 tool users: -1.414.
    grpo, _ = _tool_prefix_push(base)
    assert grpo == pytest.approx(-4 * math.sqrt(0.125), abs=1e-4)
    # Soft credit with 8 failed branches: [1, 0 x 15]: mean 1/16, std 1/4 -> failure -0.25; the
    # tool-think is trained in 4 parents + 8 branches = 12 sequences: -3.0, stronger than GRPO.
    full, _ = _tool_prefix_push(base + branches)
    assert full == pytest.approx(-3.0, abs=1e-4)
    # "once": each branch set's prefix counts once (1/5 in the parent and each branch): 2 sets x
    # -0.25 + 2 parents without branches x -0.25 = -1.0.
    once, masks = _tool_prefix_push(base + branches, prefix_weight="once")
    assert once == pytest.approx(-1.0, abs=1e-4)
    trajs = base + branches
    fam0 = [i for i, t in enumerate(trajs) if t.uid == "t0" or t.parent_uid == "t0"]
    assert sum(float(masks[i][4]) for i in fam0) == pytest.approx(1.0)          # one token's worth
    for i in fam0:                                                               # after the cut: own tokens
        assert masks[i][6:].tolist() == [1.0] * 6
    assert masks[trajs.index(base[6])][P:].tolist() == [1.0] * (12 - P)         # no branches: untouched
    with pytest.raises(ValueError, match="algo.prefix_weight"):
        loss_masks(trajs, credit="soft", trained=[True] * len(trajs), prefix_weight="bogus")


def test_prefix_weight_once_two_cuts_and_masked_copies():
    # Parent p with a branch cut at 5 and one cut at 8 (cut="every"), and one masked branch at 5.
    p = mk(0, 0.0, calls=[5, 8], uid="p")
    b5 = _family(0, "p", 5, 2, set_id=0)
    b8 = _family(0, "p", 8, 1, set_id=1)
    trajs = [p] + b5 + b8
    trained = [True, True, False, True]                 # b5[1] masked: not a copy
    masks = loss_masks(trajs, credit="soft", trained=trained, prefix_weight="once")
    # token 4: held by p, b5[0], b8[0] -> 1/3 each; token 6: p and b8[0] -> 1/2; token 9: p only.
    assert [float(masks[i][4]) for i in range(4)] == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])
    assert [float(masks[i][6]) for i in (0, 1, 3)] == pytest.approx([0.5, 1.0, 0.5])
    assert float(masks[0][9]) == 1.0


def test_tree_prefix_on_first_trained_branch():
    base = [mk(0, 0.0, calls=[6], uid="a"), mk(0, 1.0, uid="c")]
    br = [mk(0, 0.0, calls=[6], uid="a-b0.0", branch_set=0, cut=6, parent="a"),    # truncated, masked
          mk(0, 1.0, calls=[6], uid="a-b0.1", branch_set=0, cut=6, parent="a"),
          mk(0, 1.0, calls=[6], uid="a-b0.2", branch_set=0, cut=6, parent="a")]
    trajs = base + br
    trained = [True, True, False, True, True]
    adv = sequence_advantages(trajs, credit="tree", trained=trained)
    tok = token_advantages(trajs, adv, credit="tree", trained=trained)
    masks = loss_masks(trajs, credit="tree", trained=trained)
    mean = float(adv[[3, 4]].mean())                   # the trained branches only
    # The branches' prefix credit reaches the gradient exactly once, through a trained branch.
    got = [float(tok[i][4] * masks[i][4]) for i in (2, 3, 4)]
    assert got == pytest.approx([0.0, mean, 0.0], abs=1e-6) and mean != 0.0
    assert masks[3][P:6].tolist() == [1, 1, 1] and masks[4][P:6].tolist() == [0, 0, 0]
    # All branches masked: the set adds nothing, the parent keeps its own sequence.
    trained = [True, True, False, False, False]
    masks = loss_masks(trajs, credit="tree", trained=trained)
    assert all(masks[i].sum() == 0 for i in (2, 3, 4)) and masks[0][P:].sum() == 12 - P


def _trunc(group, reward, **kw):
    t = mk(group, reward, **kw)
    t.truncated = True
    return t


def test_truncated_tool_users_are_out_of_the_trigger():
    # The only tool users are truncated (masked): not "all wrong", nothing to resample.
    rolls = [_trunc(0, 0.0, calls=[5]), _trunc(0, 0.0, calls=[6]), mk(0, 0.0), mk(0, 1.0)]
    g = group_rollouts(rolls)[0]
    assert not g.triggered and not g.tool_all_wrong and g.scored_tool_using == []
    # Without masking, a truncation is an ordinary failure, so the group triggers.
    assert group_rollouts(rolls, mask_truncated=False)[0].triggered
    # A scored failed tool user next to a truncated one: triggered, and only it is a candidate.
    ok, cut = mk(0, 0.0, calls=[5], tokens=list(range(12))), _trunc(0, 0.0, calls=[7], tokens=list(range(50, 62)))
    g = group_rollouts([cut, ok, mk(0, 1.0)])[0]
    assert g.triggered
    cands = candidates(g, cut_mode="every", rule="window_entropy", window=4, rng=random.Random(0))
    assert [c.traj is ok for c in cands] == [True]
    # A truncated tool user does not rescue the group either: scored tool users all wrong.
    assert group_rollouts([_trunc(0, 1.0, calls=[5]), mk(0, 0.0, calls=[6])])[0].triggered


# -- expand: brute force's plan and the diagnostics record (fake loop, no model) --------------

class FakeLoop:
    """Stands in for AgentLoop: branches and extra rollouts are hand-built rollouts."""

    def __init__(self):
        self.rollouts = []

    def branch(self, parent, cut, k, *, force_tool_call, branch_set, train_forced=False):
        return [mk(parent.group, 0.0, calls=[cut], uid=f"{parent.uid}-b{branch_set}.{i}", branch_set=branch_set,
                   cut=cut, parent=parent.uid, tokens=parent.tokens[:cut] + [7] * (12 - cut)) for i in range(k)]

    def run(self, trajs, samples, step=0):
        pass

    def rollout(self, samples, n, *, step=0, group_offset=0, tag="r"):
        self.rollouts.append(group_offset)
        return [mk(group_offset, 0.0, uid=f"{tag}{group_offset}.{i}", calls=[6] if i % 2 else ()) for i in range(n)]


def _three_triggered_groups():
    """Groups 0, 1, 2, each with two failed tool users (distinct prefixes); window entropy before
    the cut 0.1, 0.2 and 0.9."""
    out = []
    for g, w in enumerate((0.1, 0.2, 0.9)):
        for j in range(2):
            out.append(mk(g, 0.0, calls=[6], uid=f"g{g}r{j}", ents=[0, 0, 0, w, w, w] + [0] * 6,
                          tokens=[g, j] + list(range(10))))
    return out


def _expand(cfg, base=None, reward=lambda t: 0.0, loop=None):
    from axpo.algo.resample import expand

    base = base or _three_triggered_groups()
    loop = loop or FakeLoop()
    trajs, diag = expand(loop, base, {g: f"q{g}" for g in range(3)}, reward, cfg, step=0)
    return loop, trajs, diag


def test_brute_force_spends_the_budget_where_axpo_would():
    from axpo.config import AlgoConfig

    # 6 base rollouts, budget int(0.7 * 6) = 4 extra = 2 prefixes of K=2, at most 2 per group.
    kw = dict(branches_per_prefix=2, prefixes_per_group=2, max_extra_fraction=0.7, entropy_window=3)
    _, trajs, diag = _expand(AlgoConfig(axpo=True, **kw))
    axpo_groups = sorted(t.group for t in trajs[6:])
    assert axpo_groups == [2, 2, 2, 2] and diag["prefixes_selected"] == 2   # both prefixes of group 2
    loop, trajs, diag = _expand(AlgoConfig(axpo=False, brute_force=True, **kw))
    assert sorted(t.group for t in trajs[6:]) == axpo_groups and loop.rollouts == [2, 2]
    assert all(t.parent_uid is None for t in trajs[6:]) and diag["extra_rollouts"] == 4
    # The older round-robin plan: one slot per triggered question in group order.
    loop, trajs, _ = _expand(AlgoConfig(axpo=False, brute_force=True, brute_force_plan="round_robin", **kw))
    assert loop.rollouts == [0, 1]
    with pytest.raises(ValueError, match="brute_force_plan"):
        _expand(AlgoConfig(axpo=False, brute_force=True, brute_force_plan="nope", **kw))


def test_brute_force_success_rate_counts_its_extra_rollouts():
    from axpo.config import AlgoConfig

    cfg = AlgoConfig(axpo=False, brute_force=True, branches_per_prefix=2, max_extra_fraction=0.7)
    # Extra rollouts "x0.0", "x1.0" succeed (one of each pair of two): 2 of 4.
    _, trajs, diag = _expand(cfg, reward=lambda t: float(t.uid.endswith(".0")))
    assert diag["extra_rollouts"] == 4 and diag["resample_success_rate"] == pytest.approx(0.5)
    assert diag["branch_tool_use_rate"] == pytest.approx(0.5)
    # GRPO: no extra rollouts, so the success rate is undefined, not 0.
    _, _, diag = _expand(AlgoConfig(axpo=False))
    assert diag["extra_rollouts"] == 0 and math.isnan(diag["resample_success_rate"])


def test_diagnostic_rates_from_summed_counts_not_mean_of_rates():
    from axpo.algo.resample import COUNTS, merge, rates
    from axpo.config import AlgoConfig

    cfg = AlgoConfig(axpo=True, branches_per_prefix=4, prefixes_per_group=1, max_extra_fraction=1.0)
    # Rank A: one triggered group -> one prefix (window entropy 0.9 over W=3), 4 branches, 1 succeeds.
    base_a = [mk(0, 0.0, calls=[6], uid="a", ents=[0, 0, 0, 0.9, 0.9, 0.9] + [0] * 6), mk(0, 0.0),
              mk(0, 0.0), mk(0, 0.0)]
    cfg_a = AlgoConfig(**{**cfg.__dict__, "entropy_window": 3})
    _, _, rec_a = _expand(cfg_a, base=base_a, reward=lambda t: float(t.uid.endswith("b0.0")))
    # Rank B: nothing triggered (its tool user is right), no branches.
    base_b = [mk(1, 1.0, calls=[6], uid="b"), mk(1, 0.0), mk(1, 0.0), mk(1, 0.0)]
    _, _, rec_b = _expand(cfg_a, base=base_b)
    assert rec_a["resample_success_rate"] == 0.25 and math.isnan(rec_b["resample_success_rate"])
    both = rates(merge([rec_a, rec_b]))
    assert both["resample_success_rate"] == pytest.approx(0.25)     # mean of rank rates: 0.125 / NaN
    assert both["cut_entropy"] == pytest.approx(0.9)                  # not (0.9 + 0) / 2
    assert both["trigger_rate"] == 0.5 and both["accuracy"] == pytest.approx(1 / 8)
    assert both["extra_token_share"] == pytest.approx(4 * 6 / (8 * 9))  # branch tokens after the cut
    assert set(COUNTS) <= set(both)


_REDUCE_WORKER = """
import sys
import torch.distributed as dist
from axpo.algo.resample import COUNTS, reduce_diagnostics
from axpo.distributed import Dist

rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
rec = {k: 0.0 for k in COUNTS}
if rank == 0:   # 4 branches, 1 success, cut entropy 0.9; rank 1 has no branches
    rec.update(extra_rollouts=4.0, n_extra_successes=1.0, prefixes_selected=1.0, cut_entropy_sum=0.9)
rec.update(n_base_rollouts=4.0, n_groups=1.0)
res = reduce_diagnostics(rec, Dist(rank=rank, world=2))
print("RESULT", res["resample_success_rate"], round(res["cut_entropy"], 6), res["extra_rollouts"])
dist.destroy_process_group()
"""


def test_reduce_diagnostics_sums_counts_over_two_gloo_ranks(two_gloo_ranks):
    # Rank 1 holds no branches, yet both ranks see the success rate of all branches: 1/4.
    assert two_gloo_ranks(_REDUCE_WORKER) == ["RESULT 0.25 0.9 4.0"] * 2
