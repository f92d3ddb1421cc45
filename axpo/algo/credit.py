"""Credit assignment: per-token advantages and loss weights for base rollouts and AXPO branches.

- soft (default): each branch is an ordinary sequence of its question's group (prefix tokens
  included); advantages are normalised over the enlarged group.
- subgroup: base rollouts are normalised against their group, branches against their siblings
  (same prefix), so a branch is judged only by how its tool call did from that prefix.
- tree: branch-specific tokens get the branch's (enlarged-group) advantage; the shared prefix is
  trained once, on the first branch of the set, with the mean of its branches' advantages
  (times sqrt(K) with `tree_sqrt_weight`: TreeRL's 1/sqrt(leaves) weight per leaf occurrence,
  summed over the K leaves that share the prefix).

Sequence-level statistics come from the fused `axpo.kernels.group_advantages`.
"""

from __future__ import annotations

import math

import torch

from axpo.agent.trajectory import Trajectory
from axpo.kernels import group_advantages

CREDITS = ("soft", "subgroup", "tree")


def sequence_advantages(trajs: list[Trajectory], *, credit: str, mode: str = "grpo",
                        trained: list[bool] | None = None) -> torch.Tensor:
    """One advantage per trajectory. Untrained ones (masked truncations) are left out of the
    statistics and get 0."""
    if credit not in CREDITS:
        raise ValueError(f"algo.credit: unknown mode {credit!r}; choose from {', '.join(CREDITS)}")
    trained = trained or [True] * len(trajs)
    idx = [i for i, k in enumerate(trained) if k]
    adv = torch.zeros(len(trajs), dtype=torch.float32)
    if not idx:
        return adv
    rewards = torch.tensor([trajs[i].reward for i in idx], dtype=torch.float32)
    groups = torch.tensor([trajs[i].group for i in idx], dtype=torch.long)
    sub = None
    if credit == "subgroup":
        sub = torch.tensor([0 if trajs[i].branch_set is None else 1 + trajs[i].branch_set for i in idx])
    adv[idx] = group_advantages(rewards, groups, subgroup_ids=sub, mode=mode)
    return adv


def token_advantages(trajs: list[Trajectory], seq_adv: torch.Tensor, *, credit: str,
                     tree_sqrt_weight: bool = False) -> list[torch.Tensor]:
    """Per-token advantages (aligned with each trajectory's tokens; only loss-mask positions
    matter). For `tree`, prefix positions of all but the first branch of a set get weight 0 through
    `prefix_mask`, see `loss_masks`."""
    out = [torch.full((len(t.tokens),), float(a)) for t, a in zip(trajs, seq_adv.tolist())]
    if credit != "tree":
        return out
    sets: dict[int, list[int]] = {}
    for i, t in enumerate(trajs):
        if t.branch_set is not None:
            sets.setdefault(t.branch_set, []).append(i)
    for members in sets.values():
        mean = float(seq_adv[members].mean())
        scale = math.sqrt(len(members)) if tree_sqrt_weight else 1.0
        first = trajs[members[0]]
        out[members[0]][first.prompt_len:first.cut] = mean * scale
    return out


def loss_masks(trajs: list[Trajectory], *, credit: str, trained: list[bool]) -> list[torch.Tensor]:
    """Which tokens carry loss: sampled tokens of trained trajectories; under `tree` the shared
    prefix of a branch set only once (on its first branch)."""
    masks = []
    first_of_set: set[int] = set()
    for t, keep in zip(trajs, trained):
        m = torch.tensor(t.loss_mask, dtype=torch.float32) * float(keep)
        if credit == "tree" and t.branch_set is not None:
            if t.branch_set in first_of_set:
                m[t.prompt_len:t.cut] = 0.0
            else:
                first_of_set.add(t.branch_set)
        masks.append(m)
    return masks
