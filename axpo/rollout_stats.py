"""Statistics of a set of rollouts as a mergeable record of counts.

Evaluation, AXPO's step diagnostics and the trainer's step metrics all describe rollouts with the
same few counts (rollouts, correct, tool users, truncations, tool calls and errors, new tokens).
They are kept as counts, never as rates: records of ranks, batches or steps are summed (`+`,
`merged`, `summed_over_ranks`: one all-reduce) and only then divided, so a rank or batch with few
rollouts weighs what it holds, not as much as one with many. A rate whose denominator is 0 is
`undefined` (NaN by default: e.g. the tool-error rate of rollouts without a tool call).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from axpo import distributed


def new_tokens(t) -> int:
    """Tokens this rollout sampled itself: a branch's frozen prefix was sampled by its parent."""
    if t.cut is None:
        return t.num_generated
    return t.num_generated - sum(t.loss_mask[t.prompt_len:t.cut])


def ratio(num: float, den: float, undefined: float = math.nan) -> float:
    return num / den if den > 0 else undefined


@dataclass
class RolloutCounts:
    rollouts: int = 0
    correct: int = 0              # reward > 0
    tool_users: int = 0           # made at least one tool call
    correct_tool_users: int = 0   # both
    truncated: int = 0            # hit a token or turn limit
    tool_calls: int = 0
    tool_errors: int = 0          # calls whose result was an error (unknown tool, bad format, ...)
    new_tokens: int = 0           # tokens sampled by these rollouts themselves (new_tokens)
    # Tool users whose first call ran and was the right one, and those of them that were correct: counted
    # only where the task can tell a right call (`call_correct`, e.g. the lockers task), else 0.
    right_callers: int = 0
    correct_right_callers: int = 0

    @classmethod
    def of(cls, trajs, rewards: list[float] | None = None, call_correct=None) -> RolloutCounts:
        """Counts of `trajs`; `rewards` (one per rollout) instead of each rollout's own `reward`.
        `call_correct(call: dict) -> bool` (the question's check of a {"name", "arguments"} call)
        enables the right-call counts."""
        trajs = list(trajs)
        rewards = [t.reward for t in trajs] if rewards is None else list(rewards)
        if len(rewards) != len(trajs):
            raise ValueError(f"{len(rewards)} rewards for {len(trajs)} rollouts")
        ok = [r > 0 for r in rewards]
        out = cls(
            rollouts=len(trajs),
            correct=sum(ok),
            tool_users=sum(bool(t.used_tool) for t in trajs),
            correct_tool_users=sum(bool(t.used_tool) and o for t, o in zip(trajs, ok)),
            truncated=sum(bool(t.truncated) for t in trajs),
            tool_calls=sum(len(t.tool_calls) for t in trajs),
            tool_errors=sum(c.error is not None for t in trajs for c in t.tool_calls),
            new_tokens=sum(new_tokens(t) for t in trajs))
        if call_correct is not None:
            # A right call is one the tool ran (no error) and the task judges right: arguments the
            # registry rejected (e.g. true for an integer, which equals 1 in Python) do not count.
            right = [bool(t.tool_calls) and t.tool_calls[0].error is None and bool(call_correct(
                {"name": t.tool_calls[0].name, "arguments": t.tool_calls[0].arguments})) for t in trajs]
            out.right_callers = sum(right)
            out.correct_right_callers = sum(r and o for r, o in zip(right, ok))
        return out

    def __add__(self, other: RolloutCounts) -> RolloutCounts:
        return RolloutCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @staticmethod
    def merged(records) -> RolloutCounts:
        out = RolloutCounts()
        for r in records:
            out = out + r
        return out

    def summed_over_ranks(self, d: distributed.Dist) -> RolloutCounts:
        """The sum of every rank's record (one collective; every rank must call it)."""
        total = distributed.all_reduce_sum({k: float(v) for k, v in asdict(self).items()}, d)
        return RolloutCounts(**{k: int(round(v)) for k, v in total.items()})

    def rates(self, undefined: float = math.nan) -> dict[str, float]:
        without = self.rollouts - self.tool_users
        return {
            "accuracy": ratio(self.correct, self.rollouts, undefined),
            "tool_use_rate": ratio(self.tool_users, self.rollouts, undefined),
            "truncated_rate": ratio(self.truncated, self.rollouts, undefined),
            "tool_error_rate": ratio(self.tool_errors, self.tool_calls, undefined),
            "accuracy_with_tool": ratio(self.correct_tool_users, self.tool_users, undefined),
            "accuracy_without_tool": ratio(self.correct - self.correct_tool_users, without, undefined),
            "right_call_rate": ratio(self.right_callers, self.tool_users, undefined),
            "accuracy_after_right_call": ratio(self.correct_right_callers, self.right_callers, undefined),
        }
