"""AXPO's exploration step: after the base rollouts of a batch are scored, resample tool calls from
the reasoning prefixes of all-wrong tool-using subgroups, and log the diagnostics the paper's
argument rests on. With `algo.axpo=false` this is plain GRPO; with `algo.brute_force=true` the same
extra budget goes to additional full rollouts of the same triggered questions instead (the fair
comparison: same groups, same number of extra rollouts, no prefix).
"""

from __future__ import annotations

import random
from typing import Callable

from axpo.agent.loop import AgentLoop
from axpo.agent.trajectory import Trajectory
from axpo.algo.groups import group_rollouts
from axpo.algo.selection import select
from axpo.config import AlgoConfig


def expand(loop: AgentLoop, base: list[Trajectory], samples: dict, reward_fn: Callable[[Trajectory], float],
           cfg: AlgoConfig, *, step: int, seed: int = 0) -> tuple[list[Trajectory], dict]:
    """Returns base + extra rollouts (rewarded) and the step's diagnostics. `samples` maps a
    trajectory's group to its sample."""
    rng = random.Random(hash((seed, step)) & 0xFFFFFFFF)
    groups = group_rollouts(base)
    max_extra = int(cfg.max_extra_fraction * len(base))
    extra: list[Trajectory] = []
    chosen = []
    if cfg.axpo and cfg.brute_force:
        raise ValueError("algo.axpo and algo.brute_force are exclusive: brute_force is a GRPO variant")
    if cfg.axpo:
        chosen = select(groups, cut_mode=cfg.cut, rule=cfg.selection, window=cfg.entropy_window,
                        per_group=cfg.prefixes_per_group, branches=cfg.branches_per_prefix,
                        max_extra=max_extra, rng=rng)
        for b, cand in enumerate(chosen):
            extra += loop.branch(cand.traj, cand.cut, cfg.branches_per_prefix,
                                 force_tool_call=cfg.force_tool_call, branch_set=b)
        loop.run(extra, {t.uid: samples[t.group] for t in extra}, step=step)
    elif cfg.brute_force:
        triggered = [g for g in groups if g.triggered]
        slots = max_extra // max(1, cfg.branches_per_prefix)
        # The same allocation AXPO would make: K extra rollouts per prefix slot, at most
        # prefixes_per_group slots per triggered question, round-robin over triggered questions.
        plan = []
        for _ in range(cfg.prefixes_per_group):
            for g in triggered:
                if len(plan) < slots:
                    plan.append(g.group)
        for i, grp in enumerate(plan):
            extra += loop.rollout([samples[grp]], cfg.branches_per_prefix, step=step, group_offset=grp,
                                  tag=f"x{i}.")
    for t in extra:
        t.reward = reward_fn(t)
    return base + extra, diagnostics(base, extra, groups, chosen)


def new_tokens(t: Trajectory) -> int:
    """Tokens this rollout sampled itself: a branch's frozen prefix was sampled by its parent."""
    if t.cut is None:
        return t.num_generated
    return t.num_generated - sum(t.loss_mask[t.prompt_len:t.cut])


def _zero_var(trajs: list[Trajectory]) -> tuple[int, int]:
    by: dict[int, list[float]] = {}
    for t in trajs:
        by.setdefault(t.group, []).append(t.reward)
    return sum(1 for r in by.values() if max(r) == min(r)), len(by)


def diagnostics(base: list[Trajectory], extra: list[Trajectory], groups, chosen) -> dict:
    n = max(1, len(base))
    with_tool = [g for g in groups if g.tool_using]
    zv_before, ng = _zero_var(base)
    zv_after, _ = _zero_var(base + extra)
    base_tokens = sum(new_tokens(t) for t in base)
    extra_tokens = sum(new_tokens(t) for t in extra)
    branches = [t for t in extra if t.parent_uid is not None]
    return {
        "tool_use_rate": sum(t.used_tool for t in base) / n,
        "accuracy": sum(t.reward > 0 for t in base) / n,
        "tool_error_rate": (sum(c.error is not None for t in base for c in t.tool_calls)
                            / max(1, sum(len(t.tool_calls) for t in base))),
        "all_wrong_rate": sum(g.tool_all_wrong for g in with_tool) / max(1, len(with_tool)),
        "trigger_rate": sum(g.triggered for g in groups) / max(1, len(groups)),
        "prefixes_selected": len(chosen),
        "extra_rollouts": len(extra),
        "resample_success_rate": (sum(t.reward > 0 for t in branches) / len(branches)) if branches else 0.0,
        "branch_tool_use_rate": (sum(t.used_tool for t in branches) / len(branches)) if branches else 0.0,
        "extra_token_share": extra_tokens / max(1, base_tokens),
        "zero_var_groups_before": zv_before / max(1, ng),
        "zero_var_groups_after": zv_after / max(1, ng),
        "cut_entropy": (sum(c.cut_entropy for c in chosen) / len(chosen)) if chosen else 0.0,
        "truncated_rate": sum(t.truncated for t in base) / n,
    }
