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
from collections import defaultdict

from axpo.agent.loop import AgentLoop
from axpo.distributed import Dist, all_gather_objects


def pass_at_k(n: int, c: int, k: int) -> float:
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(loop: AgentLoop, samples: list, reward_fn, *, n: int, ks=(1, 4), d: Dist | None = None,
             step: int = 10**6) -> dict:
    """Each rank evaluates its slice of `samples`; results are gathered so every rank returns the
    same numbers. `step` only seeds sampling (kept apart from training steps)."""
    d = d or Dist()
    mine = samples[d.rank::d.world]
    per_q, calls, errors, used, total, truncated = [], 0, 0, 0, 0, 0
    per_task = defaultdict(list)
    # (task, used a tool) -> [rollouts, correct]: where the accuracy comes from.
    split = defaultdict(lambda: [0, 0])
    chunk = 8
    for i in range(0, len(mine), chunk):
        batch = mine[i:i + chunk]
        trajs = loop.rollout(batch, n, step=step, group_offset=i)
        loop.release(trajs)
        for j, s in enumerate(batch):
            ts = [t for t in trajs if t.group == i + j]
            right = [reward_fn(t) > 0 for t in ts]
            c = sum(right)
            per_q.append((len(ts), c))
            per_task[s.task].append((len(ts), c))
            used += sum(t.used_tool for t in ts)
            truncated += sum(t.truncated for t in ts)
            total += len(ts)
            calls += sum(len(t.tool_calls) for t in ts)
            errors += sum(c2.error is not None for t in ts for c2 in t.tool_calls)
            for t, ok in zip(ts, right):
                cell = split[(s.task, bool(t.used_tool))]
                cell[0] += 1
                cell[1] += ok
    parts = all_gather_objects((per_q, dict(per_task), calls, errors, used, total, dict(split), truncated), d)
    per_q = [x for p in parts for x in p[0]]
    per_task = defaultdict(list)
    for p in parts:
        for k, v in p[1].items():
            per_task[k] += v
    calls, errors, used, total = (sum(p[i] for p in parts) for i in range(2, 6))
    out = {}
    for k in ks:
        if n >= k:
            out[f"pass@{k}"] = sum(pass_at_k(a, c, k) for a, c in per_q) / max(1, len(per_q))
            for task, qs in per_task.items():
                out[f"{task}/pass@{k}"] = sum(pass_at_k(a, c, k) for a, c in qs) / max(1, len(qs))
    out["tool_use_rate"] = used / max(1, total)
    out["tool_error_rate"] = errors / max(1, calls)
    out["truncated_rate"] = sum(p[7] for p in parts) / max(1, total)
    merged = defaultdict(lambda: [0, 0])
    for p in parts:
        for key, (n_roll, n_ok) in p[6].items():
            merged[key][0] += n_roll
            merged[key][1] += n_ok
    for with_tool, name in ((True, "accuracy_with_tool"), (False, "accuracy_without_tool")):
        cells = [v for (_, u), v in merged.items() if u == with_tool]
        if sum(c[0] for c in cells):
            out[name] = sum(c[1] for c in cells) / sum(c[0] for c in cells)
    for task in sorted({t for t, _ in merged}):
        rolls = merged[(task, True)][0] + merged[(task, False)][0]
        out[f"{task}/tool_use_rate"] = merged[(task, True)][0] / max(1, rolls)
        if merged[(task, True)][0]:
            out[f"{task}/accuracy_with_tool"] = merged[(task, True)][1] / merged[(task, True)][0]
    out["questions"] = len(per_q)
    return out


if __name__ == "__main__":
    # The command line lives in axpo/eval_cli.py, which builds a Trainer; this module stays free of
    # trainer imports (the trainer imports `evaluate` from here).
    from axpo.eval_cli import main

    main(sys.argv[1:])
