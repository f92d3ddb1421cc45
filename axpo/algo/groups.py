"""Group bookkeeping and AXPO's trigger.

A group is the set of rollouts of one question. It splits into the tool-using subgroup (at least one
tool call) and the no-tool subgroup. AXPO triggers on a group when its tool-using subgroup is
non-empty and every member of it is wrong; the no-tool subgroup does not matter (our choice, see
shared/design/axpo.md step 3).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from axpo.agent.trajectory import Trajectory


@dataclass
class Group:
    group: int
    rollouts: list[Trajectory]          # base rollouts only (branches are not part of the trigger)

    @property
    def tool_using(self) -> list[Trajectory]:
        return [t for t in self.rollouts if t.used_tool]

    @property
    def no_tool(self) -> list[Trajectory]:
        return [t for t in self.rollouts if not t.used_tool]

    @property
    def tool_all_wrong(self) -> bool:
        tu = self.tool_using
        return bool(tu) and all(t.reward <= 0 for t in tu)

    @property
    def triggered(self) -> bool:
        return self.tool_all_wrong


def group_rollouts(trajs: list[Trajectory]) -> list[Group]:
    by = defaultdict(list)
    for t in trajs:
        if t.parent_uid is None:
            by[t.group].append(t)
    return [Group(g, rs) for g, rs in sorted(by.items())]
