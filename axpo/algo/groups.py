"""Group bookkeeping and AXPO's trigger.

A group is the set of rollouts of one question. It splits into the tool-using subgroup (at least one
tool call) and the no-tool subgroup. AXPO triggers on a group when its *scored* tool-using subgroup
is non-empty and every member of it is wrong; the no-tool subgroup does not matter (our choice, see
shared/design/axpo.md step 3).

Scored = the rollout takes part in the advantages. With `rollout.mask_truncated` (the default) a
truncated rollout (token or turn limit) is masked out of the loss and the statistics, so it is not
evidence that acting failed either: it is left out of the trigger and is not a candidate prefix. A
group whose only tool users were truncated is therefore not "all wrong" (its scored tool-using
subgroup is empty). With `mask_truncated=False` a truncated rollout is an ordinary failure (reward
as scored) everywhere, the trigger included.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from axpo.agent.trajectory import Trajectory


@dataclass
class Group:
    group: int
    rollouts: list[Trajectory]          # base rollouts only (branches are not part of the trigger)
    mask_truncated: bool = True         # rollout.mask_truncated: truncated rollouts are not scored

    def scored(self, t: Trajectory) -> bool:
        return not (self.mask_truncated and t.truncated)

    @property
    def tool_using(self) -> list[Trajectory]:
        return [t for t in self.rollouts if t.used_tool]

    @property
    def no_tool(self) -> list[Trajectory]:
        return [t for t in self.rollouts if not t.used_tool]

    @property
    def scored_tool_using(self) -> list[Trajectory]:
        return [t for t in self.tool_using if self.scored(t)]

    @property
    def failed_tool_using(self) -> list[Trajectory]:
        """Scored tool users with reward <= 0: AXPO's candidate rollouts."""
        return [t for t in self.scored_tool_using if t.reward <= 0]

    @property
    def tool_all_wrong(self) -> bool:
        tu = self.scored_tool_using
        return bool(tu) and all(t.reward <= 0 for t in tu)

    @property
    def triggered(self) -> bool:
        return self.tool_all_wrong


def group_rollouts(trajs: list[Trajectory], *, mask_truncated: bool = True) -> list[Group]:
    by = defaultdict(list)
    for t in trajs:
        if t.parent_uid is None:
            by[t.group].append(t)
    return [Group(g, rs, mask_truncated) for g, rs in sorted(by.items())]
