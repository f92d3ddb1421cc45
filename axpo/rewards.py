"""The built-in reward, registered like a plugin's: `verify` is the task's own answer check (exact
match after normalisation, numeric tolerance, choice letters: axpo/tasks/base.py), 1.0 or 0.0. A
trajectory that never gave a final answer (cut by a limit) scores 0."""

from __future__ import annotations

from axpo.registry import register_reward
from axpo.tasks import verify as _verify


@register_reward("verify")
def verify_reward(sample, traj) -> float:
    if not traj.finished:
        return 0.0
    return float(_verify(sample, traj.final_text))
