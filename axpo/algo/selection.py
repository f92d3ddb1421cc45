"""Candidate prefixes and uncertainty-based selection.

A candidate is a failed tool-using rollout cut just before a `<tool_call>` (the first one by default,
or every call site). Its score is the policy's uncertainty near the cut, from the per-token entropies
the fused op computed during the rollout. Higher score = picked first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from axpo.agent.trajectory import Trajectory
from axpo.algo.groups import Group

SELECTIONS = ("window_entropy", "call_entropy", "prefix_entropy", "random", "lowest")


@dataclass
class Candidate:
    traj: Trajectory
    cut: int                 # token index of the <tool_call> that is dropped and resampled
    score: float
    cut_entropy: float       # mean entropy of the window before the cut (logged whatever the rule)


def _sampled_before(t: Trajectory, cut: int) -> list[float]:
    return [e for e, m in zip(t.entropies[t.prompt_len:cut], t.loss_mask[t.prompt_len:cut]) if m]


def window_entropy(t: Trajectory, cut: int, window: int) -> float:
    ents = _sampled_before(t, cut)[-window:]
    return sum(ents) / len(ents) if ents else 0.0


def score(t: Trajectory, cut: int, rule: str, window: int, rng: random.Random) -> float:
    if rule == "window_entropy":
        return window_entropy(t, cut, window)
    if rule == "call_entropy":       # entropy of the distribution the <tool_call> token came from
        return float(t.entropies[cut])
    if rule == "prefix_entropy":     # whole tool-think
        ents = _sampled_before(t, cut)
        return sum(ents) / len(ents) if ents else 0.0
    if rule == "random":
        return rng.random()
    if rule == "lowest":             # least uncertain first
        return -window_entropy(t, cut, window)
    raise ValueError(f"algo.selection: unknown rule {rule!r}; choose from {', '.join(SELECTIONS)}")


def candidates(group: Group, *, cut_mode: str, rule: str, window: int, rng: random.Random
               ) -> list[Candidate]:
    """All cut points of the failed (scored) tool-using rollouts of a triggered group, best first.
    A masked truncation is no evidence that its call failed, so it is not a candidate."""
    if cut_mode not in ("first", "every"):
        raise ValueError(f"algo.cut: unknown mode {cut_mode!r}; choose 'first' or 'every'")
    out, seen = [], set()
    for t in group.failed_tool_using:
        calls = t.tool_calls[:1] if cut_mode == "first" else t.tool_calls
        for call in calls:
            key = tuple(t.tokens[:call.start])
            if key in seen:          # identical prefixes would only duplicate branches
                continue
            seen.add(key)
            out.append(Candidate(t, call.start, score(t, call.start, rule, window, rng),
                                 window_entropy(t, call.start, window)))
    out.sort(key=lambda c: -c.score)   # stable: ties keep rollout order
    return out


def select(groups: list[Group], *, cut_mode: str, rule: str, window: int, per_group: int,
           branches: int, max_extra: int, rng: random.Random) -> list[Candidate]:
    """Top `per_group` candidates of every triggered group, then the budget: at most
    `max_extra // branches` prefixes in all, highest scores winning across groups."""
    pool = []
    for g in groups:
        if g.triggered:
            pool.extend(candidates(g, cut_mode=cut_mode, rule=rule, window=window, rng=rng)[:per_group])
    pool.sort(key=lambda c: -c.score)
    return pool[: max(0, max_extra // max(1, branches))]
