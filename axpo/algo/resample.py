"""AXPO's exploration step: after the base rollouts of a batch are scored, resample tool calls from
the reasoning prefixes of all-wrong tool-using subgroups, and log the diagnostics the paper's
argument rests on. With `algo.axpo=false` this is plain GRPO; with `algo.brute_force=true` the same
extra budget goes to additional full rollouts of the same triggered questions instead.

Brute force's allocation (`algo.brute_force_plan`):
- "axpo" (default): exactly AXPO's. The prefixes AXPO's selection would pick (same rule, same
  per-group cap `prefixes_per_group`, same budget `max_extra_fraction`, highest scores winning
  across groups) are computed, and each selected prefix becomes K extra *full* rollouts of its
  question instead of K branches. Same questions, same number of extra rollouts per question; the
  only difference is the prefix.
- "round_robin": the older plan: `max_extra // K` slots dealt out one per triggered question in
  group order, then a second round, up to `prefixes_per_group` per question. It ignores the
  selection score and the number of distinct candidate prefixes, so with a binding budget it
  favours low group indices where AXPO favours uncertain prefixes.

Diagnostics are a mergeable record of counts (numerators and denominators), summed over ranks by
`reduce_diagnostics` before any rate is formed, so a rank without branches adds nothing to a rate
instead of a zero. A rate whose denominator is 0 over all ranks is NaN (undefined, e.g. the
resample success rate of a step without extra rollouts).
"""

from __future__ import annotations

import random
from typing import Callable

from axpo import distributed
from axpo.agent.loop import AgentLoop
from axpo.agent.trajectory import Trajectory
from axpo.algo.groups import group_rollouts
from axpo.algo.selection import Candidate, select
from axpo.config import AlgoConfig
from axpo.rollout_stats import RolloutCounts, new_tokens, ratio  # noqa: F401  (new_tokens: re-export)

BRUTE_FORCE_PLANS = ("axpo", "round_robin")

# Every count of a diagnostics record. All ranks hold the same keys (one collective sums them).
COUNTS = (
    "n_base_rollouts", "n_base_tool_users", "n_base_correct", "n_base_truncated",
    "n_base_tool_calls", "n_base_tool_errors",
    "n_groups", "n_tool_groups", "n_all_wrong_groups", "n_triggered_groups",
    "n_zero_var_before", "n_zero_var_after",
    "prefixes_selected", "extra_rollouts", "n_extra_successes", "n_extra_tool_users",
    "base_tokens", "extra_tokens", "cut_entropy_sum",
)

# rate -> (numerator, denominator), both counts of the record.
RATES = {
    "tool_use_rate": ("n_base_tool_users", "n_base_rollouts"),
    "accuracy": ("n_base_correct", "n_base_rollouts"),
    "truncated_rate": ("n_base_truncated", "n_base_rollouts"),
    "tool_error_rate": ("n_base_tool_errors", "n_base_tool_calls"),
    # groups with a scored tool user whose scored tool users are all wrong / such groups
    "all_wrong_rate": ("n_all_wrong_groups", "n_tool_groups"),
    "trigger_rate": ("n_triggered_groups", "n_groups"),
    "zero_var_groups_before": ("n_zero_var_before", "n_groups"),
    "zero_var_groups_after": ("n_zero_var_after", "n_groups"),
    # AXPO: branches with reward > 0 / branches; brute force: its extra full rollouts that succeed
    # / its extra full rollouts.
    "resample_success_rate": ("n_extra_successes", "extra_rollouts"),
    "branch_tool_use_rate": ("n_extra_tool_users", "extra_rollouts"),
    "extra_token_share": ("extra_tokens", "base_tokens"),
    "cut_entropy": ("cut_entropy_sum", "prefixes_selected"),
}


def plan(groups, cfg: AlgoConfig, max_extra: int, rng: random.Random) -> list[Candidate]:
    """AXPO's selected prefixes (also brute force's plan under `brute_force_plan="axpo"`)."""
    return select(groups, cut_mode=cfg.cut, rule=cfg.selection, window=cfg.entropy_window,
                  per_group=cfg.prefixes_per_group, branches=cfg.branches_per_prefix,
                  max_extra=max_extra, rng=rng)


def round_robin(groups, cfg: AlgoConfig, max_extra: int) -> list[int]:
    triggered = [g for g in groups if g.triggered]
    slots = max_extra // max(1, cfg.branches_per_prefix)
    out: list[int] = []
    for _ in range(cfg.prefixes_per_group):
        for g in triggered:
            if len(out) < slots:
                out.append(g.group)
    return out


def expand(loop: AgentLoop, base: list[Trajectory], samples: dict, reward_fn: Callable[[Trajectory], float],
           cfg: AlgoConfig, *, step: int, seed: int = 0, mask_truncated: bool = True
           ) -> tuple[list[Trajectory], dict]:
    """Returns base + extra rollouts (rewarded) and the step's diagnostics: this rank's counts
    (COUNTS) and the rates they give on this rank alone. Across ranks, pass it to
    `reduce_diagnostics`, which sums the counts and forms the rates again (never average the
    rates). `samples` maps a trajectory's group to its sample.
    `mask_truncated` (rollout.mask_truncated): truncated rollouts are out of the trigger."""
    if cfg.axpo and cfg.brute_force:
        raise ValueError("algo.axpo and algo.brute_force are exclusive: brute_force is a GRPO variant")
    if cfg.brute_force_plan not in BRUTE_FORCE_PLANS:
        raise ValueError(f"algo.brute_force_plan: unknown plan {cfg.brute_force_plan!r}; choose from "
                         f"{', '.join(BRUTE_FORCE_PLANS)}")
    rng = random.Random(hash((seed, step)) & 0xFFFFFFFF)
    groups = group_rollouts(base, mask_truncated=mask_truncated)
    max_extra = int(cfg.max_extra_fraction * len(base))
    extra: list[Trajectory] = []
    chosen: list[Candidate] = []
    if cfg.axpo:
        chosen = plan(groups, cfg, max_extra, rng)
        for b, cand in enumerate(chosen):
            extra += loop.branch(cand.traj, cand.cut, cfg.branches_per_prefix,
                                 force_tool_call=cfg.force_tool_call, branch_set=b,
                                 train_forced=cfg.train_forced_call)
        loop.run(extra, {t.uid: samples[t.group] for t in extra}, step=step)
    elif cfg.brute_force:
        if cfg.brute_force_plan == "axpo":
            questions = [c.traj.group for c in plan(groups, cfg, max_extra, rng)]
        else:
            questions = round_robin(groups, cfg, max_extra)
        for i, grp in enumerate(questions):
            extra += loop.rollout([samples[grp]], cfg.branches_per_prefix, step=step, group_offset=grp,
                                  tag=f"x{i}.")
    for t in extra:
        t.reward = reward_fn(t)
    return base + extra, rates(diagnostics(base, extra, groups, chosen))


def _zero_var(trajs: list[Trajectory]) -> int:
    by: dict[int, list[float]] = {}
    for t in trajs:
        by.setdefault(t.group, []).append(t.reward)
    return sum(1 for r in by.values() if max(r) == min(r))


def diagnostics(base: list[Trajectory], extra: list[Trajectory], groups, chosen) -> dict[str, float]:
    """The step's counts on this rank (see COUNTS and RATES). The rollout counts are
    axpo.rollout_stats' record of the base and of the extra rollouts."""
    b, x = RolloutCounts.of(base), RolloutCounts.of(extra)
    rec = {
        "n_base_rollouts": b.rollouts,
        "n_base_tool_users": b.tool_users,
        "n_base_correct": b.correct,
        "n_base_truncated": b.truncated,
        "n_base_tool_calls": b.tool_calls,
        "n_base_tool_errors": b.tool_errors,
        "n_groups": len(groups),
        "n_tool_groups": sum(bool(g.scored_tool_using) for g in groups),
        "n_all_wrong_groups": sum(g.tool_all_wrong for g in groups),
        "n_triggered_groups": sum(g.triggered for g in groups),
        "n_zero_var_before": _zero_var(base),
        "n_zero_var_after": _zero_var(base + extra),
        "prefixes_selected": len(chosen),
        "extra_rollouts": x.rollouts,
        "n_extra_successes": x.correct,
        "n_extra_tool_users": x.tool_users,
        "base_tokens": b.new_tokens,
        "extra_tokens": x.new_tokens,
        "cut_entropy_sum": sum(c.cut_entropy for c in chosen),
    }
    assert tuple(rec) == COUNTS
    return {k: float(v) for k, v in rec.items()}


def merge(records: list[dict]) -> dict[str, float]:
    """Sum records (e.g. of several steps, or of ranks gathered by hand)."""
    return {k: sum(r[k] for r in records) for k in COUNTS}


def rates(record: dict) -> dict[str, float]:
    """Rates from summed counts (NaN where the denominator is 0), plus the counts themselves."""
    out = {}
    for name, (num, den) in RATES.items():
        out[name] = ratio(record[num], record[den])
    return {**out, **{k: record[k] for k in COUNTS}}


def reduce_diagnostics(record: dict, d: distributed.Dist) -> dict[str, float]:
    """Sum this rank's counts over all ranks (one collective) and form the rates. `record` is
    `expand`'s diagnostics (only its COUNTS are read)."""
    return rates(distributed.all_reduce_sum({k: float(record[k]) for k in COUNTS}, d))
