"""axpo/rollout_stats.py: the one record of rollout counts behind evaluation, AXPO's diagnostics and
the trainer's step metrics. Rates are formed from summed counts, so merging records of ranks or
batches never averages rates (#13: eval.py kept positional tuples, resample and the trainer their
own sums)."""

import math

import pytest

from axpo.agent.trajectory import ToolCallRecord, Trajectory
from axpo.eval import EvalRecord, QuestionResult, summarize
from axpo.rollout_stats import RolloutCounts


def _traj(reward, calls=(), truncated=False, sampled=3, cut=None):
    t = Trajectory(uid="u", sample_uid="s", group=0, prompt_len=2)
    t.append([1, 2], sampled=False)
    t.append([3] * sampled, sampled=True)
    t.tool_calls = [ToolCallRecord(start=2, end=3, name="python", arguments={}, error=e) for e in calls]
    t.truncated, t.reward, t.cut = truncated, reward, cut
    return t


def test_counts_of_rollouts():
    ts = [_traj(1.0, calls=[None]), _traj(0.0, calls=[None, "bad_json"]), _traj(0.5), _traj(0.0, truncated=True),
          _traj(0.0, sampled=5, cut=4)]   # a branch: 2 of its 5 sampled tokens are its parent's
    c = RolloutCounts.of(ts)
    assert c == RolloutCounts(rollouts=5, correct=2, tool_users=2, correct_tool_users=1, truncated=1,
                              tool_calls=3, tool_errors=1, new_tokens=3 * 4 + 3)
    r = c.rates()
    assert r["accuracy"] == 0.4 and r["tool_use_rate"] == 0.4 and r["truncated_rate"] == 0.2
    assert r["tool_error_rate"] == pytest.approx(1 / 3)
    assert r["accuracy_with_tool"] == 0.5 and r["accuracy_without_tool"] == pytest.approx(1 / 3)
    # Rewards can come from outside (evaluation scores with its own reward function).
    assert RolloutCounts.of(ts, [0.0] * 5).correct == 0
    with pytest.raises(ValueError, match="4 rewards for 5 rollouts"):
        RolloutCounts.of(ts, [0.0] * 4)


def test_merged_rates_are_ratios_of_sums_and_undefined_is_nan():
    a = RolloutCounts.of([_traj(1.0, calls=[None])])                      # 1 rollout, 1 correct
    b = RolloutCounts.of([_traj(0.0) for _ in range(3)])                  # 3 rollouts, no tool call
    assert (a + b).rates()["accuracy"] == 0.25                            # the mean of rates would say 0.5
    assert RolloutCounts.merged([a, b]) == a + b
    assert math.isnan(b.rates()["tool_error_rate"]) and b.rates(undefined=0.0)["tool_error_rate"] == 0.0
    assert math.isnan(RolloutCounts().rates()["accuracy"])


def test_evaluation_summary_does_not_depend_on_how_questions_were_split():
    qs = [QuestionResult("calc", 4, 1), QuestionResult("calc", 4, 4), QuestionResult("zoom", 4, 0)]
    by_task = {"calc": RolloutCounts(rollouts=8, correct=5, tool_users=4, correct_tool_users=4, tool_calls=4),
               "zoom": RolloutCounts(rollouts=4, tool_users=2, tool_calls=3, tool_errors=3)}
    whole = summarize(EvalRecord(qs, by_task), n=4)
    r0 = EvalRecord(qs[:1], {"calc": RolloutCounts(rollouts=4, correct=1)})
    r1 = EvalRecord(qs[1:], {"calc": RolloutCounts(rollouts=4, correct=4, tool_users=4, correct_tool_users=4,
                                                   tool_calls=4), "zoom": by_task["zoom"]})
    assert summarize(r0.merge(r1), n=4) == whole
    assert whole["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3) and whole["calc/pass@1"] == pytest.approx(0.625)
    assert whole["tool_use_rate"] == 0.5 and whole["tool_error_rate"] == pytest.approx(3 / 7)
    assert whole["accuracy_with_tool"] == pytest.approx(4 / 6) and whole["accuracy_without_tool"] == pytest.approx(1 / 6)
    assert whole["zoom/tool_use_rate"] == 0.5 and "zoom/accuracy_with_tool" in whole and whole["questions"] == 3


_WORKER = """
import sys
import torch.distributed as dist
from axpo.distributed import Dist
from axpo.rollout_stats import RolloutCounts

rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
mine = RolloutCounts(rollouts=1, correct=1) if rank == 0 else RolloutCounts(rollouts=3, tool_calls=2, tool_errors=1)
total = mine.summed_over_ranks(Dist(rank=rank, world=2))
print("RESULT", total.rollouts, total.correct, total.tool_calls, total.tool_errors, total.rates()["accuracy"])
dist.destroy_process_group()
"""


def test_summed_over_two_gloo_ranks(two_gloo_ranks):
    assert two_gloo_ranks(_WORKER) == ["RESULT 4 1 2 1 0.25"] * 2
