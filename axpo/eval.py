"""Pass@k evaluation of a policy on held-out questions, with tool-use and tool-error rates.

Pass@k uses the unbiased estimator from n >= k samples per question (Chen et al., 2021):
`1 - C(n - c, k) / C(n, k)` for c correct samples, averaged over questions.

Command line (axpo/eval_cli.py; any checkpoint: a DCP checkpoint folder of a run, or a Hugging Face folder):
    python -m axpo.eval --checkpoint runs/default/checkpoints/step_rl_000020 [--config ...] [key=value ...]
    python -m axpo.eval --checkpoint runs/default/hf
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from axpo.agent.loop import AgentLoop
from axpo.distributed import Dist, all_gather_objects
from axpo.registry import TASK_REGISTRY
from axpo.rollout_stats import RolloutCounts


def pass_at_k(n: int, c: int, k: int) -> float:
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class QuestionResult:
    task: str
    samples: int
    correct: int


@dataclass
class EvalRecord:
    """One rank's evaluation: per-question results (for Pass@k) and per-task rollout counts;
    records of ranks are merged by concatenating and summing, then the numbers are formed."""
    questions: list[QuestionResult] = field(default_factory=list)
    by_task: dict[str, RolloutCounts] = field(default_factory=dict)

    def merge(self, other: EvalRecord) -> EvalRecord:
        by_task = dict(self.by_task)
        for task, c in other.by_task.items():
            by_task[task] = by_task.get(task, RolloutCounts()) + c
        return EvalRecord(self.questions + other.questions, by_task)


def evaluate(loop: AgentLoop, samples: list, reward_fn, *, n: int, ks=(1, 4), d: Dist | None = None,
             step: int = 10**6) -> dict:
    """Each rank evaluates its slice of `samples`; results are gathered so every rank returns the
    same numbers. `step` only seeds sampling (kept apart from training steps)."""
    d = d or Dist()
    mine = samples[d.rank::d.world]
    rec = EvalRecord()
    chunk = 8
    for i in range(0, len(mine), chunk):
        batch = mine[i:i + chunk]
        trajs = loop.rollout(batch, n, step=step, group_offset=i)
        loop.release(trajs)
        for j, s in enumerate(batch):
            ts = [t for t in trajs if t.group == i + j]
            rewards = [reward_fn(t) for t in ts]
            check = _call_check(s.task)
            counts = RolloutCounts.of(ts, rewards, None if check is None else (lambda c, s=s: check(s, c)))
            rec.questions.append(QuestionResult(s.task, counts.rollouts, counts.correct))
            rec.by_task[s.task] = rec.by_task.get(s.task, RolloutCounts()) + counts
    parts = all_gather_objects(rec, d)
    rec = parts[0]
    for p in parts[1:]:
        rec = rec.merge(p)
    return summarize(rec, n=n, ks=ks)


def summarize(rec: EvalRecord, *, n: int, ks=(1, 4)) -> dict:
    """The evaluation's numbers from a merged record. A rate over no rollouts (or no tool calls)
    reads 0, as evals.json always had it; the split by tool use appears only where it has rollouts."""
    out = {}
    for k in ks:
        if n >= k:
            out[f"pass@{k}"] = _mean_pass(rec.questions, k)
            for task in rec.by_task:
                out[f"{task}/pass@{k}"] = _mean_pass([q for q in rec.questions if q.task == task], k)
    total = RolloutCounts.merged(rec.by_task.values())
    r = total.rates(undefined=0.0)
    out["tool_use_rate"], out["tool_error_rate"], out["truncated_rate"] = (
        r["tool_use_rate"], r["tool_error_rate"], r["truncated_rate"])
    if total.tool_users:
        out["accuracy_with_tool"] = r["accuracy_with_tool"]
    if total.rollouts - total.tool_users:
        out["accuracy_without_tool"] = r["accuracy_without_tool"]
    for task in sorted(rec.by_task):
        c = rec.by_task[task]
        out[f"{task}/tool_use_rate"] = c.rates(undefined=0.0)["tool_use_rate"]
        if c.tool_users:
            out[f"{task}/accuracy_with_tool"] = c.rates()["accuracy_with_tool"]
        if c.rollouts - c.tool_users:
            out[f"{task}/accuracy_without_tool"] = c.rates()["accuracy_without_tool"]
        if c.tool_users and _call_check(task) is not None:
            out[f"{task}/right_call_rate"] = c.rates()["right_call_rate"]
            if c.right_callers:
                out[f"{task}/accuracy_after_right_call"] = c.rates()["accuracy_after_right_call"]
    out["questions"] = len(rec.questions)
    return out


def _call_check(task: str):
    """The task's judge of a tool call (TaskSpec.extras["call_correct"](sample, call) -> bool), or
    None: a task that has one gets the right-call rate and the accuracy after a right call."""
    return getattr(TASK_REGISTRY.get(task, None), "extras", {}).get("call_correct")


def _mean_pass(questions: list[QuestionResult], k: int) -> float:
    return sum(pass_at_k(q.samples, q.correct, k) for q in questions) / max(1, len(questions))


if __name__ == "__main__":
    # The command line lives in axpo/eval_cli.py, which builds a Trainer; this module stays free of
    # trainer imports (the trainer imports `evaluate` from here).
    from axpo.eval_cli import main

    main(sys.argv[1:])
